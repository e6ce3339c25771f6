import socket

import pytest


@pytest.fixture(scope="session")
def default_model():
    from quest_core.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def app_url(default_model):
    """The app on the default model, served on a free loopback port for the whole test session."""
    from app.layout import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo = build_app(*default_model, max_new_tokens=24)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size="20mb")
    yield f"http://127.0.0.1:{port}/"
    demo.close()
