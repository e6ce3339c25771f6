"""Start the Quest app: `python launch.py` serves the embedded default model, offline, on 127.0.0.1:7860."""
import argparse
import logging
import os

from quest_core.config import Decoding
from quest_core.models import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="HF id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto",
                        help="auto: the GPU, or every GPU (accelerate's device map) when several are visible, else "
                             "the CPU; cuda keeps the model on one GPU")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "flashinfer"],
                        help="attention backend (auto: flashinfer with our CUDA kernels on a GPU, else torch)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    parser.add_argument("--max-upload-mb", type=int, default=50, help="largest file accepted")
    parser.add_argument("--max-document-tokens", type=int, default=100_000,
                        help="longer documents are refused (longer than the context: cut to its head or tail)")
    parser.add_argument("--max-new-tokens", type=int, default=Decoding().max_new_tokens, help="longest answer")
    parser.add_argument("--max-sessions", type=int, default=16,
                        help="browser sessions holding a document's KV at once; past it the server says it is busy")
    return parser.parse_args(argv)


def spaces_gpu():
    """Hugging Face Spaces' ZeroGPU decorator where the `spaces` package is installed, else nothing."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU


def warm_up(model, tokenizer, backend, log):
    """Short traced answers in both modes, on the backend and settings the app serves with, so the first visitor
    pays for no kernel build, plan, compile or graph capture. The document is longer than the Quest budget, so the
    sparse path runs too."""
    from quest_core.session import Session

    log("Warming up...")
    session = Session(model, tokenizer, backend=backend)
    session.ingest("Warm-up document. " * (session.config.budget // 2))
    for mode in ("quest", "dense"):
        session.configure(mode=mode)
        session.answer("What is this?", max_new_tokens=4, min_new_tokens=4, trace=True)
    session.reset()


def quiet_logging() -> None:
    """Our log lines and warnings only: no line per HTTP request (httpx logs each at INFO)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None):
    args = parse_args(argv)
    quiet_logging()
    log = logging.getLogger("quest").info
    model, tokenizer = load_model(args.model, args.dtype, args.device, log=log)
    log(f"Model ready: {type(model).__name__}, {model.dtype}, on {next(model.parameters()).device}")
    from app.layout import CSS, build_app
    from quest_core.backends import make_backend

    backend = make_backend(args.backend, next(model.parameters()).device, model.dtype)
    log(f"Attention backend: {backend.name}")
    warm_up(model, tokenizer, backend, log)
    demo = build_app(model, tokenizer, backend, max_new_tokens=args.max_new_tokens, gpu=spaces_gpu(),
                     max_document_tokens=args.max_document_tokens, max_sessions=args.max_sessions)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                max_file_size=f"{args.max_upload_mb}mb", css=CSS)


if __name__ == "__main__":
    main()
