"""The app under faults, bad input and many users: Stop mid-stream, memory after sessions end, odd files, running
out of memory, a fallback backend, and the limits (document size, open sessions). Driven over gradio_client against
servers on 127.0.0.1; the server's own state is read from `demo.state_holder` where the check needs it."""
import gc
import io
import os
import random
import re
import socket
import sys
import tempfile
import time
import types
import weakref
import zipfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from pypdf import PdfWriter

import quest_core.engine as engine_module
from app import handlers
from app.layout import build_app
from app.sessions import ChatState
from app.views import backend_text
from quest_core.backend_flashinfer import FlashInferBackend
from quest_core.backend_torch import TorchBackend
from quest_core.backends import make_backend
from quest_core.config import Decoding
from quest_core.session import Session

ROOT = Path(__file__).resolve().parent.parent
SMALL_TEXT = ("Marcellus keeps the night watch on the platform at Elsinore. Bernardo relieves Francisco at midnight, "
              "and Horatio, a scholar, comes to see the ghost the soldiers speak of.")
MAX_NEW_TOKENS = 32
MAX_DOCUMENT_TOKENS = 20_000


@contextmanager
def served(demo, max_file_size="64mb"):
    """`demo` on a free loopback port; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size=max_file_size,
                quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def app(default_model):
    """(demo, url): long answers, a 64 MB upload limit and a 20K-token document limit."""
    demo = build_app(*default_model, max_new_tokens=MAX_NEW_TOKENS, max_document_tokens=MAX_DOCUMENT_TOKENS)
    with served(demo) as url:
        yield demo, url


@pytest.fixture(scope="module")
def client(app):
    return Client(app[1], verbose=False)


@pytest.fixture(scope="module")
def hamlet(default_model):
    """The first `n` tokens of Hamlet, as text."""
    _, tokenizer = default_model
    ids = tokenizer(ROOT.joinpath("assets", "hamlet.txt").read_text(), add_special_tokens=False)["input_ids"]
    return lambda n: tokenizer.decode(ids[:n])


def ask(client, question, mode="quest", budget=256, max_new_tokens=8):
    """Submits a question; the job's outputs start (chat, question box, metrics, ...). Every app here takes 8 new
    tokens (the answer-length slider's maximum is the app's max_new_tokens)."""
    decoding = Decoding()
    return client.submit(question, mode, budget, 16, 2, False, max_new_tokens, decoding.temperature,
                         decoding.repetition_penalty, decoding.no_repeat_ngram_size, 2, 0, api_name="/ask")


def answer_text(history):
    """The last answer's text in the chat, without its attention line."""
    return handlers.answer_text(history[-1])


def server_state(demo, client) -> ChatState:
    """The ChatState the server holds for `client`'s session."""
    values = demo.state_holder[client.session_hash].state_data.values()
    return next(value for value in values if isinstance(value, ChatState))


def load(client, text):
    """Loads `text`; returns the document note ("Loaded ..." or why not), without Markdown's bold."""
    return client.predict(text, None, None, None, 50, api_name="/load_document")[0].replace("**", "")


def read_upload(client, file) -> tuple[str, str]:
    """(the document's text, the note on it); a refused file leaves the file box and the text empty."""
    file_box, _, text, note, _ = client.predict(file, api_name="/read_upload")
    if "Not loaded" in note:
        assert file_box is None and text == ""
    return text, note


def assert_still_serving(client):
    """A normal request after a bad one: load a short document and answer a question about it."""
    assert load(client, SMALL_TEXT).startswith("Loaded")
    history, *_ = ask(client, "Who relieves Francisco?").result()
    assert answer_text(history).strip()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- Stop ----

@pytest.mark.slow
def test_stop_halts_the_answer_within_a_second_and_the_conversation_stays_consistent(app, client, hamlet,
                                                                                      default_model):
    demo, _ = app
    _, tokenizer = default_model
    assert load(client, hamlet(300)).startswith("Loaded")
    job = ask(client, "Write out the whole text again, word for word, from the first line to the last.",
              max_new_tokens=MAX_NEW_TOKENS)
    for history, *_ in job:
        if answer_text(history).strip():
            break  # the answer is streaming
    stop_called = time.perf_counter()
    client.predict(api_name="/stop")
    for _ in job:
        pass
    halted_s = time.perf_counter() - stop_called
    history = job.result()[0]
    shown = answer_text(history)

    session = server_state(demo, client).session
    run = session.last_run
    assert halted_s < 1.0, f"the stream ended {halted_s:.2f} s after Stop"
    assert run.stop_reason == "cancelled" and 0 < run.new_tokens < MAX_NEW_TOKENS
    assert shown.endswith(" (stopped)")
    shown_answer = shown.removesuffix(" (stopped)")
    assert session.messages[-1] == {"role": "assistant", "content": shown_answer}
    answer_ids = session.answer_ids[-1]
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == shown_answer
    assert len(session.token_ids) == session.cache.length  # the ids are exactly the cached KV
    assert session.token_ids[len(session.token_ids) - len(answer_ids) + 1:] == answer_ids[:-1]  # last: not yet fed
    cached = len(session.token_ids)

    history, _, metrics, *_ = ask(client, "Who is Francisco?").result()
    assert len(history) == 4 and answer_text(history).strip()
    reused = int(re.search(r"reused ([\d,]+)", metrics).group(1).replace(",", ""))
    assert reused == cached  # the follow-up continued the stopped conversation's KV, all of it


# ---- memory ----

@pytest.mark.slow
def test_closed_sessions_free_their_kv(default_model, hamlet):
    """20 sessions, each with a ~2K-token document and a short answer, closed the way the app closes them."""
    model, tokenizer = default_model
    document = hamlet(2000)
    on_cuda = next(model.parameters()).device.type == "cuda"

    def one_session() -> int:
        state = ChatState(session=Session(model, tokenizer))
        state.session.ingest(document)
        state.session.answer("Who is Francisco?", max_new_tokens=4)
        kv_bytes = sum(tensor.numel() * tensor.element_size() for layer in state.session.cache.layers
                       for tensor in (layer.keys, layer.values, layer.page_bounds))
        state.close()
        return kv_bytes

    one_session()  # warm-up: allocator pools and lazy initialisation
    gc.collect()
    baseline, cuda_baseline = rss_bytes(), torch.cuda.memory_allocated() if on_cuda else 0
    kv_total = sum(one_session() for _ in range(20))
    gc.collect()
    after = rss_bytes()
    print(f"RSS {baseline / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB after 20 sessions holding "
          f"{kv_total / 2**20:.0f} MiB of KV in all")
    assert kv_total > 0.05 * baseline  # had the KV leaked, the check below would see it
    assert after <= 1.05 * baseline
    if on_cuda:
        assert torch.cuda.memory_allocated() <= 1.05 * cuda_baseline


@pytest.mark.slow
def test_leaving_frees_the_session_and_its_slot_and_past_the_limit_the_server_is_busy(default_model):
    demo = build_app(*default_model, max_new_tokens=8, max_sessions=2)
    with served(demo) as url:
        first, second, third = (Client(url, verbose=False) for _ in range(3))
        assert load(first, SMALL_TEXT).startswith("Loaded")
        assert load(second, SMALL_TEXT).startswith("Loaded")
        assert "server is busy" in load(third, SMALL_TEXT)
        assert load(first, SMALL_TEXT + " Again.").startswith("Loaded")  # an open session reloads freely
        first_session = weakref.ref(server_state(demo, first).session)

        first.close()  # the browser leaves: its heartbeat ends and the app's unload handler runs
        deadline = time.monotonic() + 45
        while "server is busy" in (status := load(third, SMALL_TEXT)):
            assert time.monotonic() < deadline
            time.sleep(1)
        assert status.startswith("Loaded")
        gc.collect()
        assert first_session() is None  # nothing holds the departed session's KV
        history, *_ = ask(third, "Who relieves Francisco?").result()
        assert answer_text(history).strip()


# ---- bad input ----

def zip_bomb() -> bytes:
    """A .docx-named zip whose one member unpacks to 256 MiB of zeros (about 250 KB packed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(256):
                member.write(zeros)
    return buffer.getvalue()


def text_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer says `text` (ASCII, no parentheses)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    pdf, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    pdf += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    pdf += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(pdf)


def encrypted(pdf: bytes, user_password: str) -> bytes:
    writer = PdfWriter(clone_from=io.BytesIO(pdf))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-256")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def blank_pdf() -> bytes:
    """A one-page PDF without a text layer (a scan, as far as text goes)."""
    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


NOISE = random.Random(0).randbytes(8192).replace(b"\x00", b"\x01")  # binary, yet no NUL byte
BAD_INPUTS = {  # name -> (bytes, the message's gist)
    "empty.txt": (b"", "is empty"),
    "whitespace.txt": (b" \n\t \r\n  ", "is empty"),
    "binary.txt": (bytes(range(256)) * 16, "binary data"),
    "noise.txt": (NOISE, "binary data"),
    "bomb.docx": (zip_bomb(), "unpacks to more than 200 MB"),
    "truncated.pdf": (text_pdf("The vault code is 31337.")[:200], "not a readable PDF"),
    "locked.pdf": (encrypted(text_pdf("The vault code is 31337."), "secret"), "encrypted PDF"),
    "binary.pdf": (bytes(range(256)) * 20, "not a readable PDF"),
    "corrupt.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage\n%%EOF", "not a readable PDF"),
    "scanned.pdf": (blank_pdf(), "no text layer"),
    "fake.docx": (b"this is not a zip archive", "not a .docx"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_a_clear_message_and_the_app_keeps_serving(client, tmp_path, name):
    data, message = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    text, note = read_upload(client, handle_file(str(path)))
    assert text == "" and re.search(message, note) and note.startswith("**Not loaded:**")
    assert_still_serving(client)


TEXT = "Ångström’s café — naïve, 12°C; « déjà vu »"
ENCODINGS = {"utf16-bom.txt": TEXT.encode("utf-16"), "utf16-le.txt": TEXT.encode("utf-16-le"),
             "utf16-be.txt": TEXT.encode("utf-16-be"), "windows-1252.txt": TEXT.encode("cp1252"),
             "latin1.txt": TEXT.replace("’", "'").replace("—", "-").encode("latin-1")}


@pytest.mark.parametrize("name", ENCODINGS)
def test_utf16_and_latin1_text_is_decoded(client, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(ENCODINGS[name])
    text, info = read_upload(client, handle_file(str(path)))
    expected = TEXT if name != "latin1.txt" else TEXT.replace("’", "'").replace("—", "-")
    assert text == expected and "tokens" in info


def test_a_pdf_locked_only_against_editing_is_read(client, tmp_path):
    path = tmp_path / "owner-locked.pdf"
    path.write_bytes(encrypted(text_pdf("The vault code is 31337."), user_password=""))
    text, _ = read_upload(client, handle_file(str(path)))
    assert "The vault code is 31337." in text


def fifty_megabytes(path: Path) -> Path:
    line = b"All work and no play makes Jack a dull boy, and the watch on the platform is cold.\n"
    path.write_bytes(line * (50 * 2**20 // len(line)))
    return path


def test_a_50_mb_text_under_the_upload_limit_is_refused_before_tokenizing(client, tmp_path):
    path = fifty_megabytes(tmp_path / "fifty.txt")
    started = time.perf_counter()
    text, note = read_upload(client, handle_file(str(path)))
    assert text == "" and "this server takes up to 160,000" in note
    assert time.perf_counter() - started < 30  # tokenizing it all would take minutes on 2 cores
    assert_still_serving(client)


def test_a_50_mb_text_over_the_upload_limit_is_refused_by_the_server(app_url, tmp_path):
    """The conftest app takes 20 MB: the client refuses to send more, and the server refuses it raw."""
    path = fifty_megabytes(tmp_path / "fifty.txt")
    client = Client(app_url, verbose=False)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(str(path)), api_name="/read_upload")
    with path.open("rb") as data:
        response = httpx.post(f"{app_url}gradio_api/upload", files=[("files", ("fifty.txt", data, "text/plain"))],
                              timeout=60)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert_still_serving(client)


def test_pasted_text_over_the_document_limits_is_refused(client, hamlet):
    assert "this server takes up to 160,000" in load(client, "word " * 40_000)  # 200,000 characters
    long_text = hamlet(25_000)
    assert len(long_text) < 160_000
    assert f"takes up to {MAX_DOCUMENT_TOKENS:,}" in load(client, long_text)
    assert_still_serving(client)


def test_a_path_in_the_file_name_is_dropped_and_nothing_is_written_outside_the_upload_folder(app, client):
    _, url = app
    name = "../../../../tmp/quest-escape/passwd.txt"
    escape = Path("/tmp/quest-escape")
    response = httpx.post(f"{url}gradio_api/upload", files=[("files", (name, b"root:x:0:0 quest test", "text/plain"))])
    stored = Path(response.json()[0])
    assert stored.name == "passwd.txt" and not escape.exists()
    upload_root = Path(os.environ.get("GRADIO_TEMP_DIR", Path(tempfile.gettempdir()) / "gradio")).resolve()
    assert stored.resolve().is_relative_to(upload_root)
    file_data = {"path": str(stored), "orig_name": name, "meta": {"_type": "gradio.FileData"}}
    text, _ = read_upload(client, file_data)
    assert text == "root:x:0:0 quest test"

    # and a path the client did not upload is not read at all
    response = httpx.post(f"{url}gradio_api/call/read_upload",
                          json={"data": [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]})
    events = httpx.get(f"{url}gradio_api/call/read_upload/{response.json()['event_id']}", timeout=30).text
    assert "event: error" in events and Path("/etc/hostname").read_text().strip() not in events
    assert_still_serving(client)


# ---- runtime faults ----

def test_out_of_memory_during_prefill_is_a_clear_message_and_the_session_recovers(app, client, hamlet, monkeypatch):
    demo, _ = app
    real_forward = engine_module.forward

    def forward_out_of_memory(model, cache, input_ids, cache_arg):
        if cache.length >= 512:  # a chunk of KV is written before memory runs out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(model, cache, input_ids, cache_arg)

    monkeypatch.setattr(engine_module, "forward", forward_out_of_memory)  # the engine's prefill chunks
    assert load(client, SMALL_TEXT).startswith("Loaded")
    assert "Out of memory while prefilling" in load(client, hamlet(1500))
    state = server_state(demo, client)
    assert state.session.cache.length == 0 and state.session.token_ids == [] and not state.document_name  # freed
    assert "Load a document first" in ask(client, "Who is Francisco?").result()[2]
    assert_still_serving(client)


def test_a_backend_fallback_is_shown_in_the_app(default_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # as if FlashInfer were not installed
    backend = make_backend("flashinfer", "cuda")
    assert isinstance(backend, TorchBackend)
    demo = build_app(*default_model, backend=backend)
    status = next(block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "server-status")
    assert "torch (fallback: FlashInfer is not importable" in status
    assert "fallback: the flashinfer backend needs CUDA" in backend_text(make_backend("flashinfer", "cpu"))
    no_kernels = types.SimpleNamespace(name="flashinfer", append_kernels=None)  # what a failed CUDA JIT build leaves
    assert "without our CUDA kernels" in FlashInferBackend.describe(no_kernels)
    assert backend_text(TorchBackend()) == "torch"
