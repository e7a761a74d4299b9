"""Resolution of the ``weights`` argument and strict loading of release files."""

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import flatopt
from flatopt.weights import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture
def release(tmp_path):
    torch.manual_seed(0)
    return flatopt.save_release(flatopt.LSTMUpdateRule(), tmp_path / "release", name="local")


def model_params():
    return torch.nn.Linear(3, 2).parameters()


def test_bundled_releases_are_listed_and_load_offline():
    names = flatopt.list_pretrained()
    assert "dm" in names
    for name in names:
        rule, config = flatopt.load_release(name)
        assert config["name"] == name
        assert config["license"]
        for key in ("command", "recipe", "seed", "commit", "meta_training_wall_time_s"):
            assert key in config["provenance"], key
        assert config["evaluation"]
        assert (flatopt.resolve_weights(name) / "README.md").is_file()


def test_local_folder_file_and_path_objects_resolve(release, monkeypatch):
    assert flatopt.resolve_weights(release) == release
    assert flatopt.resolve_weights(str(release / WEIGHTS_FILE)) == release
    assert flatopt.resolve_weights(str(release / CONFIG_FILE)) == release
    monkeypatch.chdir(release.parent)
    assert flatopt.resolve_weights("./release").resolve() == release.resolve()
    assert flatopt.resolve_weights("release").resolve() == release.resolve()
    opt = flatopt.LearnedOptimizer(model_params(), weights=release)
    assert opt.release_config["name"] == "local"


@pytest.mark.parametrize(
    "spec", ["./no-such-release", "../no/such", "/no/such/release", "~/no-such-flatopt-release"]
)
def test_missing_paths_raise_file_not_found(spec):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flatopt.resolve_weights(spec)


def test_path_object_to_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        flatopt.LearnedOptimizer(model_params(), tmp_path / "missing")


def test_folder_without_release_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a flatopt release"):
        flatopt.resolve_weights(tmp_path)


def test_unknown_name_lists_released_names():
    with pytest.raises(ValueError, match="dm"):
        flatopt.LearnedOptimizer(model_params(), "no-such-release")


def test_unreachable_hub_gives_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        OSError, match="(?s)could not get learned-optimizer weights.*pass its local folder"
    ):
        flatopt.resolve_weights("flatopt-tests/no-such-repo-7f3a9c")


def test_hub_id_loads_from_the_hub_cache_offline(release, monkeypatch, tmp_path):
    """A repository laid out in the Hub client's real cache format, read with the Hub offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--flat-lstm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(release / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert flatopt.resolve_weights("someone/flat-lstm") == snapshot
    assert flatopt.resolve_weights("someone/flat-lstm@v1") == snapshot
    opt = flatopt.LearnedOptimizer(model_params(), "someone/flat-lstm")
    assert opt.release_config["name"] == "local"


def _rewrite_tensors(release, change):
    tensors = load_file(release / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, release / WEIGHTS_FILE)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("cell2_bias"), "missing: \\['cell2_bias'\\]"),
        (lambda t: t.update(extra=torch.zeros(3)), "unexpected: \\['extra'\\]"),
        (lambda t: t.update(cell1_weight=torch.zeros(80, 23)), "has shape \\(80, 23\\)"),
        (lambda t: t["output_bias"].fill_(float("nan")), "not finite"),
    ],
)
def test_mismatched_tensors_are_refused_naming_the_file(release, change, message):
    _rewrite_tensors(release, change)
    with pytest.raises(ValueError, match=message) as info:
        flatopt.load_release(release)
    assert str(release / WEIGHTS_FILE) in str(info.value)


def test_weights_file_of_another_format_version_is_refused(release):
    tensors = load_file(release / WEIGHTS_FILE)
    save_file(tensors, release / WEIGHTS_FILE, metadata={"format_version": "2"})
    with pytest.raises(ValueError, match="format version '2'"):
        flatopt.load_release(release)
    save_file(tensors, release / WEIGHTS_FILE)  # no version recorded: accepted
    flatopt.load_release(release)


def test_truncated_and_garbage_weight_files_are_refused(release):
    data = (release / WEIGHTS_FILE).read_bytes()
    (release / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        flatopt.load_release(release)
    (release / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        flatopt.load_release(release)


def _rewrite_config(release, change):
    config = json.loads((release / CONFIG_FILE).read_text())
    change(config)
    (release / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(format_version=99), "format_version 99 is not supported"),
        (lambda c: c.pop("format_version"), "format_version None is not supported"),
        (
            lambda c: c["update_rule"].update(architecture="rnn"),
            "unknown update-rule architecture 'rnn'",
        ),
        (lambda c: c["update_rule"].update(hidden_size=10), "has shape"),
        (lambda c: c.pop("update_rule"), "missing the 'update_rule' section"),
        (lambda c: c.update(format_version=True), "format_version True is not supported"),
        (
            lambda c: c["update_rule"].update(output_scale=float("nan")),
            "output_scale must be a finite number",
        ),
        (
            lambda c: c["update_rule"].update(hidden_size=20.7),
            "hidden_size must be a positive integer",
        ),
        (lambda c: c["update_rule"].pop("hidden_size"), "lacks \\['hidden_size'\\]"),
        (lambda c: c["update_rule"].update(preprocess="log"), "unknown gradient preprocessing"),
        (lambda c: c.update(update_rule=["lstm"]), "missing the 'update_rule' section"),
        (
            lambda c: c["update_rule"].update(architecture=["lstm"]),
            "unknown update-rule architecture",
        ),
        (lambda c: c["update_rule"]["preprocess"].update(p=1000.0), "preprocess_p must lie in"),
    ],
)
def test_bad_configs_are_refused(release, change, message):
    _rewrite_config(release, change)
    with pytest.raises(ValueError, match=message) as info:
        flatopt.load_release(release)
    assert str(release) in str(info.value)  # names the file at fault


def test_invalid_json_config_is_refused_naming_the_file(release):
    (release / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON config") as info:
        flatopt.load_release(release)
    assert str(release / CONFIG_FILE) in str(info.value)


def test_save_and_load_round_trip_is_exact(release):
    rule, config = flatopt.load_release(release)
    torch.manual_seed(0)
    original = flatopt.LSTMUpdateRule()
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, rule.state_dict()[name])
    assert config["format_version"] == 1
    assert not any(p.requires_grad for p in rule.parameters())
    assert isinstance(pathlib.Path(flatopt.resolve_weights(release)), pathlib.Path)
