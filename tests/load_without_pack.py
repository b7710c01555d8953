"""Uses a BAdam checkpoint where lightning-memopt is not installed: `python load_without_pack.py CKPT LAYERS HIDDEN`.

Run by `tests/test_export.py`. The package is made unimportable before anything else is imported; the checkpoint is
read with `torch.load(weights_only=True)`, loaded strictly into an ordinary LightningModule, validated and fine-tuned
further by a plain `Trainer`, and validated once more by Lightning's own loading of the file (`ckpt_path=`). Prints
the results as JSON on the last line.
"""

import sys

sys.modules["lightning_memopt"] = None  # type: ignore[assignment]  # "not installed": every import of it fails

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from models import LlamaModule, token_loader  # noqa: E402


class ValidatedLlama(LlamaModule):
    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", self.model(input_ids=x, labels=x).loss)


def plain_trainer(**overrides) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        precision="bf16-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**kwargs, **overrides})


def main() -> None:
    path, layers, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    try:
        import lightning_memopt  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("lightning_memopt is importable: the test would prove nothing")
    val_data = token_loader(n=8, seed=1)

    state_dict = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    module = ValidatedLlama(num_layers=layers, hidden=hidden)
    module.load_state_dict(state_dict, strict=True)
    val_loss = plain_trainer().validate(module, dataloaders=val_data, verbose=False)[0]["val_loss"]

    # Lightning reading the file itself: a fresh module gets the checkpoint's weights
    from_file = plain_trainer().validate(
        ValidatedLlama(num_layers=layers, hidden=hidden), dataloaders=val_data, ckpt_path=path, verbose=False
    )[0]["val_loss"]

    # fine-tuning goes on from the weights with Lightning's own strategy
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = plain_trainer(max_steps=2)
    trainer.fit(module)
    moved = sum(not torch.equal(before[n], p) for n, p in module.named_parameters())

    assert sys.modules["lightning_memopt"] is None
    print(json.dumps({"val_loss": val_loss, "from_file": from_file, "moved": moved, "steps": trainer.global_step}))


if __name__ == "__main__":
    main()
