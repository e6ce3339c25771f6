"""Documents for the app: an uploaded file turned into plain text (with a clear `DocumentError` for anything we
cannot read), and the samples (public-domain texts in assets/, a needle-in-a-haystack passkey).

.txt/.md (UTF-8, UTF-16 with or without a BOM, else Windows-1252 or Latin-1), .pdf (pypdf), .docx (python-docx),
.html/.htm (text only)."""
import html.parser
import re
import unicodedata
import zipfile
from pathlib import Path

MAX_DOCX_UNPACKED = 200 * 1024 * 1024  # a .docx that unpacks to more than this is refused (zip bombs)
SUFFIXES = (".txt", ".md", ".pdf", ".docx", ".html", ".htm")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLES = {
    "Hamlet, the opening (~6K tokens)": "hamlet_opening.txt",
    "Hamlet, the whole play (~53K tokens: longer than the context)": "hamlet.txt",
    "Milton, Areopagitica (~24K tokens: longer than the context)": "areopagitica.txt",
}
NEEDLE = "Needle in a haystack (passkey at a chosen depth)"
NEEDLE_PATTERN = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.")


def sample_text(name: str, depth_percent: float = 50) -> str:
    """The text of the sample called `name` (a key of SAMPLES, or NEEDLE with its depth)."""
    if name == NEEDLE:
        return needle_document(depth_percent)[0]
    return ASSETS.joinpath(SAMPLES[name]).read_text()


def needle_document(depth_percent: float, filler_chars: int = 20_000) -> tuple[str, str]:
    """A passkey hidden at `depth_percent` of a public-domain filler (Areopagitica); returns (document, passkey)."""
    filler = ASSETS.joinpath("areopagitica.txt").read_text()[:filler_chars]
    passkey = str(10000 + (hash(round(depth_percent, 2)) % 90000))
    cut = int(len(filler) * depth_percent / 100)
    cut = filler.rfind("\n", 0, cut) + 1 if cut else 0
    needle = f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
    return filler[:cut] + needle + filler[cut:], passkey


def find_needle(text: str) -> str | None:
    """The needle sentence of a needle-in-a-haystack document, or None."""
    found = NEEDLE_PATTERN.search(text)
    return found.group(0) if found else None


class DocumentError(ValueError):
    """The file cannot be used as a document; the message says why, for the person who uploaded it."""


def read_document(path: str | Path, name: str | None = None) -> str:
    """The text of the file at `path`; `name` is the uploaded file's name (it picks the format)."""
    path = Path(path)
    name = Path(name or path.name).name  # never a path from the client
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise DocumentError(f"{name}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    data = path.read_bytes()
    if not data.strip():
        raise DocumentError(f"{name} is empty")
    if suffix == ".pdf":
        text = _pdf_text(path, name)
    elif suffix == ".docx":
        text = _docx_text(path, name)
    else:
        text = _decode(data, name)
        if suffix in (".html", ".htm"):
            text = _html_text(text)
    if not text.strip():
        raise DocumentError(f"{name} holds no text")
    return text


def _decode(data: bytes, name: str) -> str:
    head = data[:4096]
    utf16 = _utf16_encoding(head)
    if utf16:
        try:
            text = data.decode(utf16)
        except UnicodeDecodeError:
            raise DocumentError(f"{name} is not valid UTF-16 text") from None
    elif b"\x00" in head:
        raise DocumentError(f"{name} looks like binary data, not text")
    else:
        text = _decode_8bit(data)
    controls = sum(unicodedata.category(c) == "Cc" and c not in "\t\n\r\f" for c in text[:4096])
    if controls > 0.05 * len(text[:4096]):
        raise DocumentError(f"{name} looks like binary data, not text")
    return text


def _decode_8bit(data: bytes) -> str:
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")  # never fails


def _utf16_encoding(head: bytes) -> str | None:
    """The UTF-16 codec for a byte-order mark, or for text whose every other byte is zero (mostly ASCII); else None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    pairs = len(head) // 2
    if pairs < 2:
        return None
    if head[1::2].count(0) > 0.9 * pairs and head[0::2].count(0) < 0.1 * pairs:
        return "utf-16-le"
    if head[0::2].count(0) > 0.9 * pairs and head[1::2].count(0) < 0.1 * pairs:
        return "utf-16-be"
    return None


def _pdf_text(path: Path, name: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone does not hide the text
            raise DocumentError(f"{name} is an encrypted PDF; remove the password and upload it again")
        text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except DocumentError:
        raise
    except (PyPdfError, DependencyError, ValueError, KeyError, TypeError, OSError) as error:
        raise DocumentError(f"{name} is not a readable PDF ({error.__class__.__name__})") from None
    if not text.strip():
        raise DocumentError(f"{name} has no text layer (a scanned PDF?); OCR it first")
    return text


def _docx_text(path: Path, name: str) -> str:
    if not zipfile.is_zipfile(path):
        raise DocumentError(f"{name} is not a .docx file (not a zip archive)")
    with zipfile.ZipFile(path) as archive:
        if sum(info.file_size for info in archive.infolist()) > MAX_DOCX_UNPACKED:
            raise DocumentError(f"{name} unpacks to more than {MAX_DOCX_UNPACKED >> 20} MB; refused")
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as error:  # python-docx raises many kinds for a broken package
        raise DocumentError(f"{name} is not a readable .docx ({error.__class__.__name__})") from None
    return "\n".join(paragraph.text for paragraph in document.paragraphs)


class _TextOnly(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "template", "noscript"}

    def __init__(self):
        super().__init__()
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP
        if tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skipping -= tag in self.SKIP and self.skipping > 0

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _html_text(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    return "".join(parser.parts)
