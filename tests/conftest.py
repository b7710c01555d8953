import os
import warnings

import pytest
import torch

# two xdist workers share two cores: one thread each keeps them from fighting
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _isolate_distributed_state():
    """An in-process Trainer with a distributed strategy sets MASTER_PORT & co. in os.environ (and may open a process
    group); a later DDP launch from the same xdist worker would inherit the port and its second rank fail to bind."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny pretrained Llama directory with its own BPE tokenizer and chat template (see ``tests/pretrained.py``)."""
    from pretrained import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("pretrained") / "tiny-llama-chat")
