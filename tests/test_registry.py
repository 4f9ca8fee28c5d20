"""The model registry: discovery of drop-in files, the baselines' configurations, and clear errors
(unknown name, dims, roi, keyword arguments, broken or conflicting model files) before any training."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deconver.config import REPO_ROOT, load_preset
from deconver.registry import (
    MODELS_DIR,
    Constraints,
    ModelBuildError,
    ModelError,
    ModelFileError,
    Registry,
    UnknownModelError,
    check_model,
    count_parameters,
    create_model,
    default_registry,
    list_models,
    model_info,
    stride_divisor,
)

BASELINES = ["attention_unet", "deconver", "dynunet", "mednext", "segresnet", "smp_deeplabv3plus", "smp_unet",
             "smp_unetplusplus", "swin_unetr", "unet", "unetr"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_default(monkeypatch):
    """A new default registry for one test, so that models it registers do not outlive it."""
    import deconver.registry as registry_module

    monkeypatch.setattr(registry_module, "_DEFAULT", None)
    yield


def _write(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


TINY = """
    import torch
    from torch import nn
    from deconver.registry import register_model

    class Tiny(nn.Module):
        def __init__(self, spatial_dims, in_channels, out_channels, width):
            super().__init__()
            conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
            self.body = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))

        def forward(self, x):
            return self.body(x)

    @register_model("{name}", dims=(2, 3), divisor=2, source="test", notes="a drop-in test model")
    def build(in_channels, out_channels, spatial_dims, roi_size, *, width: int = 4):
        return Tiny(spatial_dims, in_channels, out_channels, width)
"""


def _meta(name, preset, **kwargs):
    """The network for a preset, built on the meta device when it allows it (no memory, no init)."""
    p = load_preset(preset)
    spec = dict(in_channels=p.in_channels, out_channels=p.out_channels, spatial_dims=p.spatial_dims,
                roi_size=p.protocol.roi_size, dataset=p.name, **kwargs)
    try:
        with torch.device("meta"):
            return create_model(name, **spec)
    except ModelBuildError:  # e.g. SwinUNETR calls .item() while building
        return create_model(name, **spec)


def _params(name, preset, **kwargs):
    p = load_preset(preset)
    return count_parameters(name, in_channels=p.in_channels, out_channels=p.out_channels, spatial_dims=p.spatial_dims,
                            roi_size=p.protocol.roi_size, dataset=p.name, **kwargs)


# --------------------------------------------------------------------------- discovery
def test_every_baseline_is_discovered_from_models_folder():
    assert set(BASELINES) <= set(list_models())
    assert default_registry().errors == []
    for name in BASELINES:
        assert model_info(name).file.parent == MODELS_DIR.resolve()
    assert list_models("smp_*") == ["smp_deeplabv3plus", "smp_unet", "smp_unetplusplus"]
    assert model_info("smp_unet").dims == (2,)


def test_baseline_files_are_short_declarations():
    """A baseline file is a short declaration: at most 40 lines, plus 15 for each further model of a family
    file (models/smp.py declares three)."""
    per_file: dict = {}
    for name in BASELINES:
        per_file.setdefault(model_info(name).file, []).append(name)
    for path, names in per_file.items():
        lines = path.read_text().splitlines()
        assert len(lines) <= 40 + 15 * (len(names) - 1), f"{path} has {len(lines)} lines for {names}"


def test_drop_in_file_in_temporary_folder_is_discovered(tmp_path):
    _write(tmp_path / "mine", "tiny.py", TINY.format(name="tiny_drop_in"))
    registry = Registry()
    registry.discover([tmp_path / "mine"])
    assert "tiny_drop_in" in registry.names() and "unet" in registry.names()
    assert registry.errors == []
    net = registry.create("tiny_drop_in", in_channels=2, out_channels=3, spatial_dims=3, roi_size=(4, 4, 6), width=5)
    assert net(torch.zeros(1, 2, 4, 4, 6)).shape == (1, 3, 4, 4, 6)
    assert net.model_spec["kwargs"] == {"width": 5} and net.model_spec["name"] == "tiny_drop_in"
    assert "tiny_drop_in" not in _fresh_names()  # nothing was added to models/


def _fresh_names():
    registry = Registry()
    registry.discover()
    return registry.names()


def test_missing_extra_folder_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        Registry().discover([tmp_path / "nowhere"])


def test_drop_in_model_trains_one_step_through_the_engine(tmp_path, fresh_default):
    """A study naming a temporary model folder: the engine resolves the run (discovery + checks),
    builds the network through the registry and takes one Lightning training step with its loss and
    optimizer, without any file of the repository changing."""
    engine = pytest.importorskip("deconver.engine.run")
    import lightning.pytorch as L

    from deconver.engine.labels import LabelCodec
    from deconver.engine.module import SegmentationModule

    watched = sorted(MODELS_DIR.glob("*.py")) + sorted((REPO_ROOT / "deconver" / "registry").glob("*.py"))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched}
    folder = tmp_path / "my_models"
    _write(folder, "tiny_study_net.py", TINY.format(name="tiny_study_net"))
    study = {
        "study": "dropin", "results_dir": str(tmp_path / "results"), "reports_dir": str(tmp_path / "reports"),
        "num_folds": 2, "folds": [0], "models": ["tiny_study_net"], "model_dirs": [str(folder)],
        "model_overrides": {"tiny_study_net": {"width": 6}},
        "datasets": {"hippo": {"preset": "hippocampus", "root": str(tmp_path / "data"),
                               "overrides": {"protocol": {"roi_size": [8, 8, 8], "batch_size": 2}}}},
    }
    spec = engine.resolve_run(study, "hippo", "tiny_study_net", 0, base=tmp_path)
    # resolving the run discovered the study's folder in the registry every step uses
    assert check_model("tiny_study_net", 3, (8, 8, 8), spec.model_kwargs).divisor == (2, 2, 2)
    p = spec.preset
    net = create_model(spec.model, in_channels=p.in_channels, out_channels=p.out_channels,
                       spatial_dims=p.spatial_dims, roi_size=tuple(p.protocol.roi_size), dataset=p.name,
                       **spec.model_kwargs)
    assert net.body[0].out_channels == 6
    start = [q.detach().clone() for q in net.parameters()]
    module = SegmentationModule(net, LabelCodec.from_preset(p), p.protocol, seed=0, epochs=1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, p.in_channels, 8, 8, 8, generator=g),
             "label": torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).to(torch.uint8)}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(start, net.parameters())), "no parameter changed"
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched} == before
    assert "tiny_study_net" not in _fresh_names()  # it lives in the temporary folder only
    # a mistyped keyword in the study fails while the run is resolved, before any training
    bad = {**study, "model_overrides": {"tiny_study_net": {"width": "6"}}}
    with pytest.raises(ValueError, match="width"):
        engine.resolve_run(bad, "hippo", "tiny_study_net", 0, base=tmp_path)


# --------------------------------------------------------------------------- broken and conflicting files
def test_broken_files_are_reported_by_name_and_hide_nothing(tmp_path):
    _write(tmp_path, "good.py", TINY.format(name="zz_good"))
    _write(tmp_path, "syntax.py", "from deconver.registry import register_model\n\ndef oops(:\n    pass\n")
    _write(tmp_path, "importfail.py", "import deconver.registry\nraise RuntimeError('cannot import me')\n")
    _write(tmp_path, "raising.py", """
        from deconver.registry import register_model

        @register_model("zz_raising", dims=(3,))
        def build(in_channels, out_channels, spatial_dims, roi_size):
            raise RuntimeError("the builder is broken")
    """)
    registry = Registry(dirs=[tmp_path])
    with pytest.warns(UserWarning) as warned:
        errors = registry.discover()
    assert sorted(Path(str(w.message).split(":")[0]).name for w in warned) == ["importfail.py", "syntax.py"]
    assert any("syntax.py:3: SyntaxError" in e for e in errors), errors
    assert any("importfail.py:2: RuntimeError: cannot import me" in e for e in errors), errors
    assert len(errors) == 2
    assert registry.names() == ["zz_good", "zz_raising"]
    assert registry.create("zz_good", in_channels=1, out_channels=1, spatial_dims=2, roi_size=(4, 4))
    with pytest.raises(ModelBuildError, match=r"raising\.py: builder build\(\) of model 'zz_raising' failed: "
                                              r"RuntimeError: the builder is broken"):
        registry.create("zz_raising", in_channels=1, out_channels=1, spatial_dims=3, roi_size=(4, 4, 4))
    with pytest.raises(UnknownModelError) as err:
        registry.info("oops")
    assert "zz_good" in str(err.value) and "syntax.py" in str(err.value)


def test_two_files_registering_one_name_are_rejected(tmp_path):
    _write(tmp_path, "a.py", TINY.format(name="zz_dup"))
    _write(tmp_path, "b.py", textwrap.dedent(TINY.format(name="zz_dup")) + textwrap.dedent("""
        @register_model("zz_only_b", dims=(2,))
        def build_b(in_channels, out_channels, spatial_dims, roi_size):
            return Tiny(spatial_dims, in_channels, out_channels, 2)
    """))
    registry = Registry(dirs=[tmp_path])
    with pytest.warns(UserWarning):
        errors = registry.discover()
    assert len(errors) == 1 and "a.py" in errors[0] and "b.py" in errors[0] and "'zz_dup'" in errors[0]
    assert registry.names() == ["zz_only_b"]
    with pytest.raises(ModelError, match=r"more than one file .*a\.py.*b\.py"):
        registry.check("zz_dup", 2, (4, 4))


def test_declaration_mistakes_name_the_file(tmp_path):
    _write(tmp_path, "badname.py", """
        from deconver.registry import register_model

        @register_model("Bad Name")
        def build(in_channels, out_channels, spatial_dims, roi_size):
            pass
    """)
    _write(tmp_path, "noroi.py", """
        from deconver.registry import register_model

        @register_model("zz_noroi")
        def build(in_channels, out_channels, spatial_dims):
            pass
    """)
    _write(tmp_path, "baddefault.py", """
        from monai.networks.nets import UNet
        from deconver.registry import register_model

        @register_model("zz_baddefault", wraps=UNet, defaults=dict(chanels=(4, 8)))
        def build(in_channels, out_channels, spatial_dims, roi_size, **kwargs):
            return UNet(spatial_dims, in_channels, out_channels, **kwargs)
    """)
    registry = Registry(dirs=[tmp_path])
    with pytest.warns(UserWarning):
        errors = registry.discover()
    text = "\n".join(errors)
    assert "badname.py" in text and "model name" in text
    assert "noroi.py" in text and "roi_size" in text
    assert "baddefault.py" in text and "chanels" in text
    assert registry.names() == []


# --------------------------------------------------------------------------- clear errors before training
def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as err:
        check_model("unett", 3, (64, 64, 64), {})
    message = str(err.value)
    assert "unknown model 'unett'" in message and "did you mean 'unet'" in message
    assert all(name in message for name in BASELINES)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_unsupported_dims():
    with pytest.raises(ModelError, match=r"'smp_unet' \(models/smp.py\) supports 2D inputs only, not 3D"):
        check_model("smp_unet", 3, (64, 64, 64), {})
    check_model("smp_unet", 2, (64, 64), {})


def test_swin_unetr_needs_multiples_of_32_and_more_than_one_bottleneck_voxel():
    with pytest.raises(ModelError, match=r"multiple of 32 \(axis 1 is 48\); use e.g. \[32, 64, 32\]"):
        check_model("swin_unetr", 3, (32, 48, 32), {})
    with pytest.raises(ModelError, match=r"coarsest feature map would be 1x1x1"):
        check_model("swin_unetr", 3, (32, 32, 32), {})
    check_model("swin_unetr", 3, (32, 32, 64), {})
    # the rule is real: MONAI's network itself fails on a 1 x 1 bottleneck (2D, to stay cheap)
    from monai.networks.nets import SwinUNETR

    with pytest.raises(ValueError, match="spatial element"):
        SwinUNETR(in_channels=1, out_channels=1, spatial_dims=2, feature_size=12)(torch.zeros(1, 1, 32, 32))


def test_unetr_takes_only_its_img_size():
    with pytest.raises(ModelError, match="'img_size' is set from the dataset preset"):
        check_model("unetr", 3, (64, 64, 64), {"img_size": [96, 96, 96]})
    with pytest.raises(ModelError, match="multiple of 16"):
        check_model("unetr", 3, (64, 64, 40), {})
    info = model_info("unetr")
    assert info.fixed_size and "fixed size" in info.constraints(3).describe()
    net = create_model("unetr", in_channels=1, out_channels=2, spatial_dims=2, roi_size=(32, 32),
                       hidden_size=48, mlp_dim=96, num_heads=4, feature_size=12)
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match=r"built for inputs of size \[32, 32\] only"):
        net(torch.zeros(1, 1, 64, 64))


def test_smp_decoders_need_their_divisor_and_deeplab_a_batch_of_two():
    with pytest.raises(ModelError, match="multiple of 32"):
        check_model("smp_unetplusplus", 2, (48, 48), {})
    with pytest.raises(ModelError, match="multiple of 32"):
        check_model("smp_unet", 2, (64, 80), {})
    check_model("smp_deeplabv3plus", 2, (48, 48), {})  # output stride 16
    with pytest.raises(ModelError, match="batch size of at least 2"):
        check_model("smp_deeplabv3plus", 2, (64, 64), {}, batch_size=1)
    assert check_model("smp_unet", 2, (64, 64), {"encoder_depth": 4}).divisor == (16, 16)


def test_keyword_arguments_are_checked_by_name_and_type():
    with pytest.raises(ModelError, match=r"unknown keyword argument 'filter' \(did you mean 'filters'"):
        check_model("dynunet", 3, (64, 64, 64), {"filter": [16, 32, 64, 128, 256]})
    with pytest.raises(ModelError, match=r"keyword 'res_block': Input should be a valid boolean \(got 'false'"):
        check_model("dynunet", 3, (64, 64, 64), {"res_block": "false"})
    with pytest.raises(ModelError, match="keyword 'use_v2'"):
        check_model("swin_unetr", 3, (64, 64, 64), {"use_v2": "true"})
    with pytest.raises(ModelError, match="keyword 'init_filters'.*integer"):
        check_model("segresnet", 3, (64, 64, 64), {"init_filters": 16.5})
    with pytest.raises(ModelError, match="keyword 'deep_supervision'"):
        check_model("dynunet", 3, (64, 64, 64), {"deep_supervision": True})
    with pytest.raises(ModelError, match="keyword 'encoder_weights'"):
        check_model("smp_unet", 2, (64, 64), {"encoder_weights": "imagenet"})
    with pytest.raises(ModelError, match="'in_channels' is set from the dataset preset"):
        check_model("unet", 3, (64, 64, 64), {"in_channels": 3})
    with pytest.raises(ModelError, match="keyword 'variant'"):
        check_model("deconver", 3, (64, 64, 64), {"variant": "isles"})
    with pytest.raises(ModelError, match="variant 'glas' is a 2D network but the dataset is 3D"):
        check_model("deconver", 3, (64, 64, 64), {"variant": "glas"})
    # valid values of the right types pass, None means "unset", and lists stand for tuples (YAML)
    check_model("dynunet", 3, (64, 64, 64), {"res_block": True, "dropout": None, "norm_name": ["batch", {}]})
    check_model("swin_unetr", 3, (64, 64, 64), {"use_v2": True})
    check_model("segresnet", 3, (64, 64, 64), {"blocks_down": [1, 2, 2], "blocks_up": [1, 1]})


def test_kwargs_change_the_constraints():
    assert check_model("segresnet", 3, (32, 32, 32), {"blocks_down": [1, 2, 2], "blocks_up": [1, 1]}).divisor == (4, 4, 4)
    aniso = {"strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]], "kernel_size": [3, 3, 3], "filters": [8, 16, 32]}
    assert check_model("dynunet", 3, (16, 16, 8), aniso).divisor == (4, 4, 2)
    with pytest.raises(ModelError, match="axis 2 is 3"):
        check_model("dynunet", 3, (16, 16, 3), aniso)
    net = create_model("dynunet", in_channels=1, out_channels=2, spatial_dims=3, roi_size=(16, 16, 8), **aniso)
    assert net(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 2, 16, 16, 8)
    assert stride_divisor([1, [2, 1], 2], 2) == (4, 2)


def test_roi_must_match_dims():
    with pytest.raises(ModelError, match="roi_size must be 3 positive ints"):
        check_model("unet", 3, (64, 64), {})
    with pytest.raises(ModelError, match="in_channels must be a positive int"):
        create_model("unet", in_channels=0, out_channels=1, spatial_dims=2, roi_size=(32, 32))


def test_constraints_min_roi():
    assert Constraints((16, 16, 16), False, 2, 1).min_roi() == (16, 16, 32)
    assert Constraints((32, 32), False, 1, 1).min_roi() == (32, 32)
    assert Constraints((8, 8), False, 3, 1).min_roi() == (16, 16)
    for name in BASELINES:
        info = model_info(name)
        for dims in info.dims:
            cons = info.constraints(dims)
            check_model(name, dims, cons.min_roi(), {})
            smaller = list(cons.min_roi())
            smaller[-1] -= cons.divisor[-1]
            with pytest.raises(ModelError):
                check_model(name, dims, smaller or [0], {})


# --------------------------------------------------------------------------- the study's configurations
def test_authors_configurations():
    from torch import nn

    dyn = _meta("dynunet", "isles22")
    assert list(dyn.filters) == [32, 64, 128, 256, 512] and list(dyn.strides) == [1, 2, 2, 2, 2]
    assert list(dyn.kernel_size) == [3] * 5 and not dyn.deep_supervision
    assert dyn.conv_block.__name__ == "UnetBasicBlock" and type(dyn.bottleneck).__name__ == "UnetBasicBlock"
    assert any(isinstance(m, nn.InstanceNorm3d) for m in dyn.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in dyn.modules())
    seg = _meta("segresnet", "brats23")
    assert seg.init_filters == 32 and list(seg.blocks_down) == [1, 2, 2, 4] and list(seg.blocks_up) == [1, 1, 1]
    unetr = _meta("unetr", "isles22")
    assert unetr.vit.blocks[0].mlp.linear1.out_features == 3072 and len(unetr.vit.blocks) == 12
    assert unetr.vit.blocks[0].attn.num_heads == 12 and unetr.hidden_size == 768 and unetr.feat_size == (4, 4, 4)
    assert unetr.vit.patch_embedding.proj_type == "conv" and type(unetr.encoder1.layer).__name__ == "UnetResBlock"
    assert any(isinstance(m, nn.InstanceNorm3d) for m in unetr.modules())
    swin = _meta("swin_unetr", "brats23")
    assert swin.encoder1.layer.conv1.conv.out_channels == 24 and not hasattr(swin.swinViT, "layers1c")
    assert hasattr(_meta("swin_unetr", "brats23", use_v2=True).swinViT, "layers1c")
    smp_net = _meta("smp_unet", "glas")
    assert smp_net.encoder.__class__.__name__ == "ResNetEncoder" and len(smp_net.encoder.layer3) == 6  # resnet34
    mednext = _meta("mednext", "isles22")
    assert mednext.__class__.__name__ == "MedNeXt"


def test_deconver_presets_follow_the_dataset_and_variant():
    # PAPER.md §2: the exact parameter counts of the paper's configurations
    assert _params("deconver", "isles22") == 10_476_545
    assert _params("deconver", "brats23") == 10_553_859
    assert _params("deconver", "glas") == 20_794_785
    assert _params("deconver", "fives") == 20_794_785
    assert _params("deconver", "isles22", variant="isles22-bundle") == 7_811_073
    assert _params("deconver", "fives", variant="fives-bundle") == 6_449_953
    # other datasets get the BraTS layout (3D) with their own channels; the divisor comes from the network
    hippo = _meta("deconver", "hippocampus")
    assert hippo.channels == (32, 64, 128, 256, 512) and (hippo.in_channels, hippo.out_channels) == (1, 3)
    assert check_model("deconver", 3, (64, 64, 64), {}, dataset="isles22").divisor == (8, 8, 8)
    assert check_model("deconver", 3, (64, 64, 64), {}, dataset="hippocampus").divisor == (16, 16, 16)
    assert check_model("deconver", 2, (64, 64), {}).divisor == (32, 32)
    assert check_model("deconver", 3, (32, 32, 32), {"channels": [16, 32, 64]}).divisor == (4, 4, 4)


def test_unetr_has_no_dead_cross_attention_norms():
    net = _meta("unetr", "isles22")
    assert not any("norm_cross_attn" in n for n, _ in net.named_parameters())


# --------------------------------------------------------------------------- `deconver models`
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deconver.cli", "models", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_models_command_prints_the_table():
    out = _cli("--dataset", "isles22", "--dataset", "glas")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0]
    assert "isles22 (64x64x64)" in header and "glas (256x256)" in header and "source" in header
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(BASELINES) <= set(rows)
    assert "10.48M" in rows["deconver"] and "20.79M" in rows["deconver"]
    assert "encoder_weights=None" in rows["smp_unet"] and "| — |" in rows["smp_unet"]
    assert "fixed size" in rows["unetr"] and "x32" in rows["swin_unetr"]


def test_models_command_json_reports_broken_files_and_keeps_the_rest(tmp_path):
    _write(tmp_path, "good.py", TINY.format(name="zz_good"))
    _write(tmp_path, "syntax.py", "def oops(:\n")
    _write(tmp_path, "raising.py", """
        from deconver.registry import register_model

        @register_model("zz_raising", dims=(3,))
        def build(in_channels, out_channels, spatial_dims, roi_size):
            raise RuntimeError("the builder is broken")
    """)
    out = _cli("zz_*", "--json", "--model-dir", str(tmp_path), "--dataset", "hippocampus", "--dataset", "fives")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"zz_good", "zz_raising"}
    # Tiny: conv3d(1 -> 4, k3) + conv3d(4 -> 3, k1) on hippocampus; conv2d(3 -> 4, k3) + conv2d(4 -> 1, k1) on fives
    assert rows["zz_good"]["params"] == {"hippocampus": 1 * 4 * 27 + 4 + 4 * 3 + 3, "fives": 3 * 4 * 9 + 4 + 4 + 1}
    assert rows["zz_good"]["notes"] == "a drop-in test model" and rows["zz_good"]["divisor"] == {"2": [2, 2], "3": [2, 2, 2]}
    assert "raising.py" in rows["zz_raising"]["build_errors"]["hippocampus"]
    assert rows["zz_raising"]["problems"]["fives"].endswith("not supported")
    assert any("syntax.py:1: SyntaxError" in e for e in report["errors"])
    assert "syntax.py" in out.stderr and "raising.py" in out.stderr


def test_describe_models_uses_the_study_datasets_dirs_and_kwargs(tmp_path):
    from deconver.registry.table import describe_models

    folder = tmp_path / "extra"
    _write(folder, "tiny.py", TINY.format(name="zz_study"))
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({
        "study": "s", "models": ["zz_study"], "model_dirs": [str(folder)],
        "model_overrides": {"zz_study": {"width": 8}},
        "datasets": {"small_isles": {"preset": "isles22", "root": "/nowhere",
                                     "overrides": {"protocol": {"roi_size": [32, 32, 32]}}}},
    }))
    report = describe_models("zz_*", config=str(study), registry=Registry())
    assert report["datasets"] == {"small_isles": {"preset": "isles22", "spatial_dims": 3, "roi_size": [32, 32, 32],
                                                  "in_channels": 2, "out_channels": 1}}
    (row,) = report["models"]
    assert row["params"] == {"small_isles": 2 * 8 * 27 + 8 + 8 * 1 + 1}  # width 8 from the study
    assert report["errors"] == []


def test_readme_example_is_a_working_model_file(tmp_path):
    """The README's example, written to a folder, is discovered, validated and built."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Add a baseline in one file", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    _write(tmp_path, "basic_unet.py", code)
    registry = Registry()
    registry.discover([tmp_path])
    assert "basic_unet" in registry.names() and registry.errors == []
    assert registry.check("basic_unet", 3, (16, 16, 32)).divisor == (16, 16, 16)
    with pytest.raises(ModelError, match="coarsest feature map"):
        registry.check("basic_unet", 3, (16, 16, 16))
    with pytest.raises(ModelError, match="keyword 'bias'"):
        registry.check("basic_unet", 3, (16, 16, 32), {"bias": "false"})
    for dims, roi in ((2, (16, 32)), (3, (16, 16, 32))):
        net = registry.create("basic_unet", in_channels=2, out_channels=3, spatial_dims=dims, roi_size=roi,
                              features=[4, 4, 8, 8, 16, 4])
        assert net(torch.randn(1, 2, *roi)).shape == (1, 3, *roi)


def test_register_model_outside_discovery_goes_to_the_default_registry(fresh_default):
    from torch import nn

    from deconver.registry import register_model

    @register_model("zz_inline_identity_test", dims=(2,), notes="defined in a test")
    def build(in_channels, out_channels, spatial_dims, roi_size):
        return nn.Conv2d(in_channels, out_channels, 1)

    assert "zz_inline_identity_test" in list_models()
    net = create_model("zz_inline_identity_test", in_channels=3, out_channels=2, spatial_dims=2, roi_size=(5, 7))
    assert net(torch.zeros(1, 3, 5, 7)).shape == (1, 2, 5, 7)
    with pytest.raises(ModelFileError, match="'unet' is registered by models/unet.py and .*test_registry.py"):
        register_model("unet")(build)
    with pytest.raises(ModelError, match="more than one file"):  # rejected until one is renamed
        check_model("unet", 2, (32, 32), {})
