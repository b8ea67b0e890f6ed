"""Variants of one release: the fleet publishes a base pack and a 4-bit variant for boards
without dot-product instructions; each device takes the one its CPU tags call for. Real
packs (the tiny model at both levels), a real signed repository served from memory, the
real updater and health gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import structlog

from agent import __version__
from agent.packs.decide import choose_variant, decide
from agent.packs.store import PackStore
from agent.packs.updater import offline_updater, provision_trust
from agent.packs.verify import UpdateRejected
from fleet.errors import RepositoryError
from fleet.repository import FleetRepository
from model_packs import hardware as hw
from model_packs.build.builder import build_pack
from model_packs.build.quantize import dequantize_blockwise_4bit, quantize_blockwise_4bit
from model_packs.format import read_manifest
from tests.conftest import tiny_build_options
from tests.repo_sim import BASE, MemoryRepository

A72 = "Features\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
A76 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp\n"
X86 = "flags\t\t: fpu vme de pse tsc msr sse sse2 avx avx2 fma\n"


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "board", "tags"),
    [
        ("aarch64", A72, "any", {"aarch64", "aarch64-no-dotprod"}),
        ("aarch64", A76, "rpi5", {"aarch64", "aarch64-dotprod", "rpi5"}),
        ("x86_64", X86, "any", {"x86_64"}),
        ("aarch64", "", "any", {"aarch64", "aarch64-no-dotprod"}),  # no Features line: assume the least
    ],
)
def test_hardware_tags_from_cpuinfo(machine: str, cpuinfo: str, board: str, tags: set[str]) -> None:
    assert hw.tags_for(machine, hw.cpu_features(cpuinfo), board) == tags


def test_q4_1_blocks_are_represented_exactly() -> None:
    """A weight made of Q4_1 blocks (d * q + m, q in 0..15, each block using 0 and 15) comes
    back from the 4-bit form exactly: the layers of the GGUF source lose nothing."""
    rng = np.random.default_rng(0)
    n, k = 8, 96
    q = rng.integers(0, 16, size=(n, k // 32, 32))
    q[:, :, 0], q[:, :, 1] = 0, 15
    d = rng.uniform(0.001, 0.05, size=(n, k // 32, 1)).astype(np.float32)
    m = rng.uniform(-0.4, 0.1, size=(n, k // 32, 1)).astype(np.float32)
    w = (d * q + m).astype(np.float32).reshape(n, k)
    back = dequantize_blockwise_4bit(quantize_blockwise_4bit(w))
    assert np.abs(back - w).max() < 1e-6


VARIANTS = {"int4-block32": {"hardware": ["aarch64-no-dotprod"]}}


@pytest.mark.parametrize(
    ("custom", "tags", "chosen"),
    [
        ({"variants": VARIANTS}, {"aarch64", "aarch64-no-dotprod"}, "int4-block32"),
        ({"variants": VARIANTS}, {"aarch64", "aarch64-dotprod"}, None),
        ({"variants": VARIANTS}, {"x86_64"}, None),
        ({"variants": {"int4-block32": {"hardware": ["any"]}}}, {"x86_64"}, None),  # any never picks one
        ({"variants": {"../../x": {"hardware": ["x86_64"]}}}, {"x86_64"}, None),  # not a name: skipped
        ({"variants": {"v": {"hardware": "x86_64"}}}, {"x86_64"}, None),  # malformed: skipped
        ({"variants": ["int4-block32"]}, {"x86_64"}, None),
        (None, {"x86_64"}, None),
    ],
)
def test_choose_variant(custom: dict[str, object] | None, tags: set[str], chosen: str | None) -> None:
    found = choose_variant(custom, "tiny", "1.0.0", frozenset(tags))
    assert (found.name if found else None) == chosen
    if found:
        assert found.path == "packs/tiny/1.0.0/int4-block32.tar" and "dot-product" in found.why


def test_a_variant_target_must_sign_the_variant_it_was_chosen_as() -> None:
    tags = frozenset({"aarch64-no-dotprod"})
    variant = choose_variant({"variants": VARIANTS}, "tiny", "1.0.0", tags)
    base_signed = {"name": "tiny", "version": "1.0.0", "variant": "int8-block32", "hardware": ["any"]}
    with pytest.raises(UpdateRejected, match="names variant 'int8-block32'") as err:
        decide("tiny@1.0.0", base_signed, "0.9.0", __version__, tags, variant)
    assert err.value.reason_code == "bad_target"


# ---------------------------------------------------------------- through the repository


@pytest.fixture(scope="module")
def release(
    tmp_path_factory: pytest.TempPathFactory, tiny_source: Path, tiny_versions: dict[str, Path]
) -> dict[str, Path]:
    """tiny 0.0.2 at both levels (the 4-bit one with a gate loose enough for a random model)."""
    packs = tmp_path_factory.mktemp("variant-packs")
    int4 = build_pack(
        tiny_build_options(
            tiny_source,
            packs,
            version="0.0.2",
            quantization="int4-block32",
            min_top1=0.0,
            max_ppl_ratio=100.0,
        )
    )
    return {"base": tiny_versions["0.0.2"], "int4": int4, "seed": tiny_versions["0.0.1"]}


@pytest.fixture()
def repo(tmp_path: Path, release: dict[str, Path]) -> FleetRepository:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(release["base"])
    repo.publish(release["int4"], hardware=("aarch64-no-dotprod",))
    return repo


def test_the_fleet_lists_the_variant_in_the_signed_base_target(
    repo: FleetRepository, release: dict[str, Path]
) -> None:
    targets = repo.load("targets").signed.targets
    base = targets["packs/tiny/0.0.2.tar"].unrecognized_fields["custom"]
    assert base["variant"] == "int8-block32"
    int4_ram = read_manifest(release["int4"]).runtime.min_ram_mb
    assert base["variants"] == {"int4-block32": {"hardware": ["aarch64-no-dotprod"], "min_ram_mb": int4_ram}}
    variant = targets["packs/tiny/0.0.2/int4-block32.tar"].unrecognized_fields["custom"]
    assert (variant["variant"], variant["hardware"], variant["version"]) == (
        "int4-block32",
        ["aarch64-no-dotprod"],
        "0.0.2",
    )
    assert read_manifest(release["int4"]).quantization.bits == 4


def test_a_second_variant_needs_hardware_and_is_published_once(
    tmp_path: Path, release: dict[str, Path]
) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(release["base"])
    with pytest.raises(RepositoryError, match="needs --hardware TAG"):
        repo.publish(release["int4"])
    repo.publish(release["int4"], hardware=("aarch64-no-dotprod",))
    with pytest.raises(RepositoryError, match="already published"):
        repo.publish(release["int4"], hardware=("rpi4",))
    with pytest.raises(RepositoryError, match="not above the published"):
        repo.publish(release["base"])


def _install(
    tmp_path: Path, repo: FleetRepository, seed: Path, board: str, variants: bool = True
) -> tuple[Path, list[dict[str, object]]]:
    store = PackStore(tmp_path / "dev")
    store.seed(seed, "tiny@0.0.1")
    provision_trust(tmp_path / "dev" / "tuf", repo.meta_dir / "1.root.json")
    fetcher = MemoryRepository.snapshot_of(repo.dir)
    up = offline_updater(
        store,
        tmp_path / "dev" / "tuf",
        BASE,
        __version__,
        hardware=board,
        variants=variants,
        fetcher=fetcher,
        threads=1,
    )
    with structlog.testing.capture_logs() as logs:
        path = up.install("tiny@0.0.2")
    return path, [e for e in logs if e["event"] == "pack_variant"]


def test_a_board_without_dot_product_installs_the_4bit_variant_and_says_why(
    tmp_path: Path, repo: FleetRepository, release: dict[str, Path]
) -> None:
    """`updates.hardware` names the tag here (this test machine's own CPU is x86_64): the
    same path a Raspberry Pi 4 takes from its cpuinfo, which make test-arm64 runs."""
    path, said = _install(tmp_path, repo, release["seed"], board="aarch64-no-dotprod")
    assert read_manifest(path).variant == "int4-block32"
    assert said[0]["variant"] == "int4-block32" and said[0]["hardware"] == "aarch64-no-dotprod"
    assert "no dot-product instructions" in said[0]["why"]
    outcome = PackStore(tmp_path / "dev").state().last_outcome
    assert outcome is not None and (outcome["state"], outcome["variant"]) == ("activated", "int4-block32")


@pytest.mark.parametrize(("board", "variants"), [("any", True), ("aarch64-no-dotprod", False)])
def test_other_boards_and_opted_out_devices_install_the_base(
    tmp_path: Path, repo: FleetRepository, release: dict[str, Path], board: str, variants: bool
) -> None:
    if hw.NO_DOTPROD in hw.detect().tags:
        pytest.skip("this machine is itself a board without dot-product: it takes the variant")
    path, said = _install(tmp_path, repo, release["seed"], board=board, variants=variants)
    assert read_manifest(path).variant == "int8-block32"
    assert said[-1]["variant"] == "base"


def test_the_4bit_graph_computes_the_dequantized_product(tmp_path: Path) -> None:
    """MatMulNBits on the codes plus the block sums times the offsets equals x @ W.T for the
    dequantized W: the offsets outside the kernel are applied to the right blocks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from model_packs.build.graph import GraphOptions, _Blob, _GraphBuilder

    rng = np.random.default_rng(1)
    n, k = 48, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    blob = _Blob(tmp_path / "weights.bin")
    g = _GraphBuilder(None, GraphOptions(quantized=True, bits=4), blob)  # type: ignore[arg-type]
    g.linear("x", w, "proj", "y")
    blob.close()
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "one_linear",
        [helper.make_tensor_value_info("x", f32, ["b", "s", k])],
        [helper.make_tensor_value_info("y", f32, ["b", "s", n])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    expected = x @ dequantize_blockwise_4bit(quantize_blockwise_4bit(w)).T
    assert np.abs(y - expected).max() < 0.05 * np.abs(expected).max()
    assert (
        np.abs(y - x @ w.T).max() > np.abs(y - expected).max()
    )  # it is the 4-bit product, not the float one


# ---------------------------------------------------------------- by RAM

LOW_RAM = {
    "min_ram_mb": 400,
    "variants": {
        "mixed-block32": {"hardware": ["any"], "min_ram_mb": 250},
        "int4-block32": {"hardware": ["any"], "min_ram_mb": 200},
        "int4-block32-acc1": {"hardware": ["aarch64-no-dotprod"], "min_ram_mb": 500},
    },
}


@pytest.mark.parametrize(
    ("ram_mb", "tags", "chosen"),
    [
        (300, {"x86_64"}, "mixed-block32"),  # the largest variant that fits
        (220, {"x86_64"}, "int4-block32"),
        (150, {"x86_64"}, None),  # nothing fits: the base (its health gate refuses it with a reason)
        (500, {"x86_64"}, None),  # the base fits
        (None, {"x86_64"}, None),  # RAM unknown: the base
        # published for this CPU, but too big for this board: the RAM rule picks
        (300, {"aarch64", "aarch64-no-dotprod"}, "mixed-block32"),
        (600, {"aarch64", "aarch64-no-dotprod"}, "int4-block32-acc1"),
    ],
)
def test_choose_variant_by_ram(ram_mb: int | None, tags: set[str], chosen: str | None) -> None:
    found = choose_variant(LOW_RAM, "tiny", "1.0.0", frozenset(tags), ram_mb)
    assert (found.name if found else None) == chosen
    if found and found.tag == "ram":
        assert f"the base needs 400 MB of RAM, this device has {ram_mb} MB" in found.why


def _with_min_ram(pack: Path, dest: Path, min_ram_mb: int) -> Path:
    """A copy of ``pack`` whose manifest asks for ``min_ram_mb`` (as a larger model's would);
    the manifest is not among the files it hashes, and TUF signs the tar it travels in."""
    import json
    import shutil

    shutil.copytree(pack, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["runtime"]["min_ram_mb"] = min_ram_mb
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


@pytest.fixture()
def ram_repo(tmp_path: Path, release: dict[str, Path]) -> FleetRepository:
    """tiny 0.0.2 whose base needs 400 MB, with its 4-bit variant for any hardware."""
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(_with_min_ram(release["base"], tmp_path / "big-base", 400))
    repo.publish(release["int4"])  # no --hardware: allowed, it needs less RAM than the base
    return repo


@pytest.mark.parametrize(("ram_mb", "variant"), [(300, "int4-block32"), (4096, "int8-block32")])
def test_a_board_too_small_for_the_base_installs_the_variant_that_fits(
    tmp_path: Path, ram_repo: FleetRepository, release: dict[str, Path], ram_mb: int, variant: str
) -> None:
    store = PackStore(tmp_path / "dev")
    store.seed(release["seed"], "tiny@0.0.1")
    provision_trust(tmp_path / "dev" / "tuf", ram_repo.meta_dir / "1.root.json")
    up = offline_updater(
        store,
        tmp_path / "dev" / "tuf",
        BASE,
        __version__,
        ram_mb=ram_mb,
        fetcher=MemoryRepository.snapshot_of(ram_repo.dir),
        threads=1,
    )
    with structlog.testing.capture_logs() as logs:
        path = up.install("tiny@0.0.2")
    assert read_manifest(path).variant == variant
    said = [e for e in logs if e["event"] == "pack_variant"]
    if variant == "int4-block32":
        assert said[0]["hardware"] == "ram" and "this device has 300 MB" in said[0]["why"]
    else:
        assert said[-1]["variant"] == "base"


def test_a_variant_for_any_hardware_must_need_less_ram_than_the_base(
    tmp_path: Path, release: dict[str, Path]
) -> None:
    repo = FleetRepository(tmp_path / "repo", tmp_path / "keys")
    repo.init()
    repo.publish(release["int4"])  # the small one as the base
    with pytest.raises(RepositoryError, match="or less RAM than the base"):
        repo.publish(_with_min_ram(release["base"], tmp_path / "big", 400))
