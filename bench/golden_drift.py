"""Where do the recorded golden tokens rank under other kernels, and under broken packs?

The health gate judges a pack teacher-forced: each recorded golden token must stay among
the device's top-k next tokens. This measures both sides of that line on the default pack
(one JSON line): the same pack with 8-bit MatMulNBits computed in fp32 (accuracy_level 0:
what onnxruntime runs on a core without dot-product instructions, such as a Pi 4's A72),
and packs that must fail (weights scrambled, tokenizer ids shifted).

    python bench/golden_drift.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from agent.inference import Engine, load_pack
from model_packs.format import default_pack_path

Variant = Callable[[Path, Path], None]


def _fp32_compute(src: Path, dst: Path) -> None:
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    (dst / "model.onnx").unlink()
    onnx.save(model, str(dst / "model.onnx"))


def _scrambled_weights(src: Path, dst: Path) -> None:
    blocks = np.frombuffer((src / "weights.bin").read_bytes(), dtype=np.uint8).reshape(-1, 64)
    (dst / "weights.bin").unlink()
    (dst / "weights.bin").write_bytes(np.random.default_rng(0).permutation(blocks).tobytes())


def _shifted_tokenizer(src: Path, dst: Path) -> None:
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {tok: (i + 1) % len(vocab) for tok, i in vocab.items()}
    (dst / "tokenizer.json").unlink()
    (dst / "tokenizer.json").write_text(json.dumps(data))


def _ranks(pack: Path) -> np.ndarray:
    """Rank of every recorded golden token under teacher forcing (0 = top-1; a non-finite
    row counts as the worst rank)."""
    engine = Engine(load_pack(pack, hash_files=False, check_ram=False), threads=2)
    out = []
    for g in engine.pack.manifest.golden:
        prompt = engine.prompt_ids(g.prompt)
        rows = engine.logits_for(prompt + list(g.token_ids))[
            len(prompt) - 1 : len(prompt) - 1 + len(g.token_ids)
        ]
        want = np.asarray(g.token_ids)
        above = (rows > rows[np.arange(len(want)), want][:, None]).sum(axis=1)
        out.append(np.where(np.isfinite(rows).all(axis=1), above, rows.shape[1]))
    return np.concatenate(out)


def _summary(ranks: np.ndarray) -> dict[str, float]:
    return {
        "max_rank": int(ranks.max()),
        "share_top1": round(float((ranks < 1).mean()), 3),
        "share_top2": round(float((ranks < 2).mean()), 3),
        "share_top5": round(float((ranks < 5).mean()), 3),
    }


def main() -> None:
    src = default_pack_path()
    variants: dict[str, Variant | None] = {
        "as_built": None,
        "fp32_compute": _fp32_compute,
        "scrambled_weights": _scrambled_weights,
        "shifted_tokenizer": _shifted_tokenizer,
    }
    work = Path(tempfile.mkdtemp(prefix="golden-drift-"))
    result: dict[str, object] = {"bench": "golden_drift", "positions": 0}
    try:
        for name, change in variants.items():
            pack = work / name
            pack.mkdir()
            for f in src.iterdir():
                os.link(f, pack / f.name)  # changed files are replaced, never written through
            if change is not None:
                change(src, pack)
            ranks = _ranks(pack)
            result["positions"] = int(ranks.size)
            result[name] = _summary(ranks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
