"""Shared test set-up.

The local Hub stand-in's address must be in HF_ENDPOINT before `huggingface_hub.constants` is first imported
(importing transformers does that), so it is chosen here, at the very top, before any test module imports anything.
"""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
# The offline switches also block 127.0.0.1, where the stand-in Hub runs.
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("TRANSFORMERS_OFFLINE", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pvp-hf-home-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_server():
    from hub_server import HubServer

    server = HubServer(port=HUB_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and are then immune to other processes competing for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
