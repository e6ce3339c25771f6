import socket

import pytest

MARKERS = {
    "slow": "takes more than about 10 s on 2 CPU cores (the quick evaluation, runs of the default model)",
    "browser": "drives the app in a real browser (Debian's chromium, Playwright)",
    "gpu": "needs CUDA (our kernels, FlashInfer, CUDA graphs); skipped without it",
}


def pytest_configure(config):
    """The fast subset for development: python -m pytest -q -m "not slow and not browser and not gpu" tests"""
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture(scope="session")
def default_model():
    from quest_core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def app_url(default_model):
    """The app on the default model, served on a free loopback port for the whole test session."""
    from app.layout import CSS, build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_app(*default_model, max_new_tokens=24)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size="20mb", css=CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
