"""`deltatune export RUN_DIR OUT_DIR`: the fine-tuned model as a plain model that needs no deltatune to load.

Adapters are folded into the weights and their layers replaced by the modules they then equal
(`adapters.merge_and_unload`), so the saved model has the base architecture: `AutoModel*.from_pretrained(OUT_DIR)`
in plain transformers loads it. Before anything is published, the export is reloaded from disk and its logits are
compared with the adapter model's on a test batch; the directory appears only when that check passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.errors import UserError
from deltatune.runs import open_run, write_plain_model


def export_run(run_path: str | Path, out_path: str | Path, echo=print) -> dict[str, Any]:
    saved, out = open_run(run_path), Path(out_path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; choose a new output directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose a new output directory")
    difference = write_plain_model(saved.load(with_data=True), out)
    echo(f"exported {saved.run_dir.path} to {out}: merged, reloaded, max |logit difference| = {difference:.2e}")
    return {"path": str(out), "max_abs_logit_difference": difference}
