"""Zero-point network checkpoints and the exported model.

A checkpoint is a directory:

- ``model.safetensors``: the weights (safetensors: no pickle, so loading a
  checkpoint cannot run code);
- ``model_card.json``: the model config, the training config, a hash of the
  training data, the metrics measured on held-out nights, the clear-sky models
  by instrument (ml/zp_clearsky.py: the context needs them), the interval
  calibration, the photocal and torch versions and the code revision, and the
  zero-point convention;
- ``model.onnx`` (optional): the network exported for CPU scoring with
  onnxruntime, checked against eager PyTorch when it is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ml.zp_features import INPUT_NAMES, TARGET_SCALE_MAG, FeatureSet, model_inputs
from ml.zp_model import AZPRC, AZPRCConfig
from ml.zp_train import Z95

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
ONNX = "model.onnx"


def data_hash(features: FeatureSet) -> str:
    """SHA-256 of the arrays a model was trained on (which nights, which values)."""
    h = hashlib.sha256()
    for name in (
        "patch", "stars", "n_stars", "telemetry", "catalog_zp_mag", "catalog_zp_err_mag",
        "plane_zp_mag", "log_sky", "mjd", "target_mag", "domain", "expid",
    ):  # fmt: skip
        h.update(np.ascontiguousarray(getattr(features, name)).tobytes())
    h.update("\n".join(map(str, features.night)).encode())
    return h.hexdigest()


def save_checkpoint(directory: str | Path, model: AZPRC, card: dict[str, Any]) -> Path:
    """Write the weights and the model card (``card`` plus the model config and
    versions) to ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    full = {
        "model": "AZP-RC",
        "model_config": model.config.to_dict(),
        "target_scale_mag": TARGET_SCALE_MAG,
        "torch": torch.__version__,
        **card,
    }
    (out / CARD).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    return out


def load_checkpoint(directory: str | Path, *, device: str = "cpu") -> tuple[AZPRC, dict[str, Any]]:
    """The model (in eval mode) and its card, from a checkpoint directory."""
    src = Path(directory)
    for name in (WEIGHTS, CARD):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src}: not a zero-point checkpoint (no {name})")
    card = json.loads((src / CARD).read_text())
    model = AZPRC(AZPRCConfig.from_dict(card["model_config"]))
    state = load_file(str(src / WEIGHTS), device=device)
    for name in ("sigma_scale", "tail_scale"):
        # Checkpoints before the per-domain calibration hold one row for all domains.
        if name in state and state[name].dim() == 1:
            state[name] = state[name].expand_as(getattr(model, name)).clone()
    model.load_state_dict(state)
    return model.to(device).eval(), card


class _Scoring(torch.nn.Module):
    """What is exported: offset, log-variance and the 95 % tail factor."""

    def __init__(self, model: AZPRC) -> None:
        super().__init__()
        self.model = model

    def forward(self, patch, stars, n_stars, summary, telemetry, context, domain):  # type: ignore[no-untyped-def]
        parts = self.model.forward_parts(patch, stars, n_stars, summary, telemetry, context, domain)
        return parts.offset, parts.log_var, parts.tail


def export_onnx(model: AZPRC, example: FeatureSet, path: str | Path) -> Path:
    """Export ``model`` to ONNX with dynamic batch and star counts; ``example``
    (a few exposures) traces it."""
    path = Path(path)
    inputs = model_inputs(example, slice(0, max(2, min(4, len(example)))))
    tensors = tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)
    batch = torch.export.Dim("batch", min=1)
    stars = torch.export.Dim("stars", min=2)
    dynamic = (
        {0: batch}, {0: batch, 1: stars}, {0: batch}, {0: batch}, {0: batch}, {0: batch},
        {0: batch},
    )  # fmt: skip
    model = model.cpu().eval()
    torch.onnx.export(
        _Scoring(model).eval(),
        tensors,
        str(path),
        input_names=list(INPUT_NAMES),
        output_names=["offset", "log_var", "tail"],
        dynamic_shapes=dynamic,
        verbose=False,
    )
    return path


@dataclass
class OnnxScorer:
    """Scores exposures with the exported model on CPU (onnxruntime)."""

    path: str | Path
    threads: int = 1

    def __post_init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )

    def predict(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
        """Offset and 1-sigma (68.3 %) uncertainty [mag], shape (n,)."""
        offset, sigma, _ = self.intervals(features)
        return offset, sigma

    def intervals(self, features: FeatureSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offset and the half-widths of its 68.3 % and 95 % intervals [mag]."""
        offset, log_var, tail = self.session.run(None, model_inputs(features))
        sigma = np.exp(0.5 * log_var.astype(np.float64)) * TARGET_SCALE_MAG
        return offset.astype(np.float64) * TARGET_SCALE_MAG, sigma, Z95 * tail * sigma
