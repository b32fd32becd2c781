"""Render the reports' restricted Markdown to PDF with fpdf2 (pure Python, no LaTeX).

Supported: `#`–`####` headings, paragraphs with **bold**, *italic*, `code` and [links](...), `-` / `1.`
lists, fenced code blocks, pipe tables, images on a line of their own `![caption](file.png)`, `>` quotes
and `---` rules. DejaVu fonts (shipped with matplotlib) cover arrows, ×, − and the other symbols we use.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
from fpdf import FPDF
from fpdf.fonts import FontFace

from llama.checkpoint import atomic_write

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = {
    ("sans", ""): "DejaVuSans.ttf",
    ("sans", "B"): "DejaVuSans-Bold.ttf",
    ("sans", "I"): "DejaVuSans-Oblique.ttf",
    ("sans", "BI"): "DejaVuSans-BoldOblique.ttf",
    ("mono", ""): "DejaVuSansMono.ttf",
    ("mono", "B"): "DejaVuSansMono-Bold.ttf",
}
BODY, SMALL = 10, 8
HEADING_SIZES = {1: 17, 2: 13.5, 3: 11.5, 4: 10.5}
LINE = 5  # mm per body line
INLINE = re.compile(r"(\*\*.+?\*\*|`[^`]+`|\[[^\]]+\]\([^)]+\)|(?<![\w*])\*[^*\s][^*]*?\*(?![\w*]))")
IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)\s*$")
BULLET = re.compile(r"^(\s*)([-*]|\d+\.)\s+(.*)$")


def inline_runs(text: str) -> list[tuple[str, str, str | None]]:
    """Split Markdown inline text into (style, text, url) runs; style is '', 'B', 'I' or 'code'."""
    runs = []
    for part in INLINE.split(text):
        if not part:
            continue
        if part.startswith("**") and part.endswith("**") and len(part) > 4:
            runs += [("B" + s if s in ("", "I") else s, t, u) for s, t, u in inline_runs(part[2:-2])]
        elif part.startswith("`") and part.endswith("`"):
            runs.append(("code", part[1:-1], None))
        elif part.startswith("[") and part.endswith(")") and "](" in part:
            label, url = part[1:-1].split("](", 1)
            runs += [(s, t, url) for s, t, _ in inline_runs(label)]
        elif part.startswith("*") and part.endswith("*") and len(part) > 2:
            runs += [(s + "I" if s in ("", "B") else s, t, u) for s, t, u in inline_runs(part[1:-1])]
        else:
            runs.append(("", part, None))
    return runs


def plain(text: str) -> str:
    """Inline Markdown with the markup removed (for table cells)."""
    return "".join(t for _, t, _ in inline_runs(text))


class MarkdownPDF(FPDF):
    def __init__(self, title: str):
        super().__init__(format="A4")
        for (family, style), name in FONTS.items():
            self.add_font(family, style, str(FONT_DIR / name))
        self.set_title(title)
        self.set_creator("python -m project.reports (fpdf2)")
        self.set_margins(18, 16, 18)
        self.set_auto_page_break(True, margin=16)
        self.doc_title = title
        self.add_page()

    def footer(self):
        self.set_y(-11)
        self.set_font("sans", "", 7.5)
        self.set_text_color(120)
        self.cell(0, 5, f"{self.doc_title} — page {self.page_no()}", align="C")
        self.set_text_color(0)

    # ---- blocks ----------------------------------------------------------------------------------
    def heading(self, level: int, text: str):
        size = HEADING_SIZES.get(level, BODY)
        if self.get_y() > self.page_break_trigger - 30:  # keep a heading with what follows it
            self.add_page()
        self.ln(3 if level > 1 else 0)
        self.set_font("sans", "B", size)
        self.multi_cell(0, size * 0.5, plain(text), align="L", new_x="LMARGIN", new_y="NEXT")
        self.ln(1.5)

    def paragraph(self, text: str, size: float = BODY, indent: float = 0, style: str = ""):
        left = self.l_margin
        self.set_left_margin(left + indent)
        self.set_x(left + indent)
        height = LINE * size / BODY
        self.write_runs(text, size, height, style)
        self.ln(height)
        self.set_left_margin(left)

    def write_runs(self, text: str, size: float, height: float, style: str = ""):
        """Flow inline runs from the current position, wrapping between words only."""
        for run_style, run, url in inline_runs(text):
            if run_style == "code":
                self.set_font("mono", "", size - 1)
                self.set_text_color(90, 30, 30)
            else:
                self.set_font("sans", "".join(sorted(set(run_style + style))), size)
                self.set_text_color(*((20, 60, 150) if url else (0, 0, 0)))
            # fpdf2 breaks a run's first word mid-word when it does not fit the line: move it down whole.
            first = re.match(r"\S*", run).group(0)
            room = self.w - self.r_margin - self.get_x()
            if first and self.get_x() > self.l_margin + 0.1 and self.get_string_width(first) > room:
                self.ln(height)
            self.write(height, run, link=url if url and url.startswith("http") else "")
        self.set_text_color(0)

    def list_item(self, marker: str, text: str, depth: int):
        indent = 5 + 5 * depth
        self.set_font("sans", "", BODY)
        self.set_x(self.l_margin + indent - 4)
        self.cell(4, LINE, "•" if marker in "-*" else marker)
        left = self.l_margin
        self.set_left_margin(left + indent)
        self.write_runs(text, BODY, LINE)
        self.ln(LINE)
        self.set_left_margin(left)

    def code_block(self, text: str):
        self.set_font("mono", "", SMALL)
        self.set_fill_color(242, 242, 242)
        self.multi_cell(0, 3.8, text.rstrip("\n") or " ", fill=True, align="L", new_x="LMARGIN", new_y="NEXT")
        self.ln(2)

    def table_block(self, rows: list[list[str]]):
        header, body = rows[0], rows[1:]
        n = len(header)
        body = [(r + [""] * n)[:n] for r in body]
        cells = [[plain(c).replace("<br>", "\n") for c in r] for r in [header, *body]]
        size = SMALL if n <= 7 else 7
        self.set_font("sans", "", size)
        widths = [max(self.get_string_width(r[i]) for r in cells[1:] or cells) + 3 for i in range(n)]
        self.set_font("sans", "B", size)
        widths = [max(w, self.get_string_width(h) + 3) for w, h in zip(widths, cells[0])]
        self.set_font("sans", "", size)
        # Long text columns wrap; short ones keep their natural width.
        page = self.epw
        if sum(widths) > page:
            fair = page / n
            small = sum(w for w in widths if w <= fair)
            big = [w for w in widths if w > fair]
            scale = (page - small) / sum(big) if big else 1
            widths = [w if w <= fair else w * scale for w in widths]
        numeric = [
            all(re.fullmatch(r"[−\-+]?[\d,.]+\s*[%×]?|×|—|n/a|", r[i].strip()) for r in cells[1:]) for i in range(n)
        ]
        align = ["RIGHT" if numeric[i] and i > 0 else "LEFT" for i in range(n)]
        with self.table(
            width=min(sum(widths), page),
            col_widths=widths,
            text_align=align,
            line_height=size * 0.5,
            headings_style=FontFace(emphasis="BOLD", fill_color=(225, 230, 240)),
            borders_layout="SINGLE_TOP_LINE",
            align="LEFT",
            padding=0.8,
        ) as table:
            for r in cells:
                table.row(r)
        self.ln(3)

    def image_block(self, path: Path, caption: str):
        if not path.exists():
            self.paragraph(f"[missing image: {path.name}]", style="I")
            return
        from PIL import Image

        with Image.open(path) as im:
            w_px, h_px = im.size
        w = min(self.epw, w_px / 150 * 25.4)  # 150 dpi natural size, never wider than the page
        h = w * h_px / w_px
        room = self.eph - 10
        if h > room:
            w, h = w * room / h, room
        if self.get_y() + h > self.page_break_trigger:
            self.add_page()
        self.image(str(path), x=self.l_margin + (self.epw - w) / 2, y=self.get_y(), w=w, h=h)
        self.set_y(self.get_y() + h + 1)
        if caption:
            self.set_font("sans", "I", SMALL)
            self.multi_cell(0, 4, caption, align="C", new_x="LMARGIN", new_y="NEXT")
        self.ln(2)

    def rule(self):
        self.ln(1)
        self.set_draw_color(180)
        self.line(self.l_margin, self.get_y(), self.l_margin + self.epw, self.get_y())
        self.ln(3)


def split_row(line: str) -> list[str]:
    """Cells of a pipe-table row; `\\|` is a literal bar inside a cell."""
    line = line.strip().strip("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def render(markdown: str, base_dir: Path) -> MarkdownPDF:
    """Lay out the Markdown text; relative image paths are resolved against base_dir."""
    lines = markdown.splitlines()
    title = next((l.lstrip("# ").strip() for l in lines if l.startswith("# ")), "report")
    pdf = MarkdownPDF(plain(title))
    i, para = 0, []

    def flush():
        if para:
            pdf.paragraph(" ".join(s.strip() for s in para))
            pdf.ln(1.5)
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            pdf.code_block("\n".join(lines[i + 1 : j]))
            i = j + 1
            continue
        if m := re.match(r"^(#{1,6})\s+(.*)$", line):
            flush()
            pdf.heading(len(m.group(1)), m.group(2))
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = split_row(lines[i])
                if not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                    rows.append(cells)
                i += 1
            pdf.table_block(rows)
            continue
        elif m := IMAGE.match(stripped):
            flush()
            pdf.image_block(base_dir / m.group(2), m.group(1))
        elif m := BULLET.match(line):
            flush()
            text = m.group(3)
            while i + 1 < len(lines) and lines[i + 1].startswith("  ") and not BULLET.match(lines[i + 1]):
                i += 1
                text += " " + lines[i].strip()
            pdf.list_item(m.group(2), text, len(m.group(1)) // 2)
            if i + 1 >= len(lines) or not BULLET.match(lines[i + 1]):
                pdf.ln(1.5)
        elif stripped.startswith(">"):
            flush()
            pdf.paragraph(stripped.lstrip("> "), indent=4, style="I")
            pdf.ln(1)
        elif re.fullmatch(r"-{3,}|\*{3,}", stripped):
            flush()
            pdf.rule()
        elif not stripped:
            flush()
        else:
            para.append(line)
        i += 1
    flush()
    return pdf


def write_pdf(markdown_path: Path, pdf_path: Path | None = None) -> Path:
    """Render a Markdown file next to itself as .pdf (written atomically); returns the PDF's path."""
    markdown_path = Path(markdown_path)
    pdf_path = Path(pdf_path) if pdf_path else markdown_path.with_suffix(".pdf")
    pdf = render(markdown_path.read_text(), markdown_path.parent)
    data = bytes(pdf.output())
    atomic_write(pdf_path, lambda f: f.write(data))
    return pdf_path


def count_pages(pdf_path: Path) -> int:
    """Pages of a PDF, counted from its page objects (independent of the library that wrote it)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", Path(pdf_path).read_bytes()))
