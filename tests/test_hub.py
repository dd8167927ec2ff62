"""Hub ids in from_pretrained and push_to_hub, offline: a Hugging Face cache laid out as huggingface_hub lays it
out stands in for the hub, and HfApi's network calls are replaced by ones that record what they were given."""
import os
import shutil

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects

from mllm import MLLMConfig, UnifiedModel
from tests.helpers import write_llm, write_vqrae
from vqrae import VQRAE
from vqrae.config import ConfigError
from vqrae.hub import ALLOW_PATTERNS, is_hub_id, prepare_upload, resolve, write_model_card

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """``publish(repo_id, folder, commit)``: put ``folder`` into an offline HF cache as that commit of the repo."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import; the module constants are what its functions consult.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(repo_id: str, folder, commit: str = COMMIT_A, ref: str = "main") -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)

    return publish


def vqrae_outputs(model: VQRAE) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = model.eval()(images)
    return out.reconstruction, out.indices


def assert_same_vqrae(a: VQRAE, b: VQRAE) -> None:
    (rec_a, idx_a), (rec_b, idx_b) = vqrae_outputs(a), vqrae_outputs(b)
    assert torch.equal(idx_a, idx_b)
    assert torch.equal(rec_a, rec_b)


@pytest.fixture(scope="module")
def unified_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("unified")
    cfg = MLLMConfig(llm=write_llm(root / "llm", "llama"), vqrae=write_vqrae(root / "vqrae"), dtype="float32",
                     new_token_noise=0.02)
    torch.manual_seed(0)
    UnifiedModel.build(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(str(root / "model"))
    return str(root / "model")


def unified_logits(model: UnifiedModel) -> torch.Tensor:
    ids = torch.arange(3, 3 + 12).view(1, 12)
    codes = model.image_codes_to_ids(torch.arange(16).view(1, 16))
    with torch.no_grad():
        return model.eval()(torch.cat([ids, codes], dim=1)).logits


# -- resolving ----------------------------------------------------------------------------------------------
def test_vqrae_by_hub_id_matches_directory(tmp_path, hub):
    folder = write_vqrae(tmp_path / "vqrae", seed=3)
    hub("someone/tiny-vqrae", folder)
    assert_same_vqrae(VQRAE.from_pretrained("someone/tiny-vqrae"), VQRAE.from_pretrained(folder))


def test_revision_selects_commit(tmp_path, hub):
    old, new = write_vqrae(tmp_path / "old", seed=1), write_vqrae(tmp_path / "new", seed=2)
    hub("someone/tiny-vqrae", old, COMMIT_A)
    hub("someone/tiny-vqrae", new, COMMIT_B)  # refs/main now points at B
    assert_same_vqrae(VQRAE.from_pretrained("someone/tiny-vqrae"), VQRAE.from_pretrained(new))
    assert_same_vqrae(VQRAE.from_pretrained("someone/tiny-vqrae", revision=COMMIT_A), VQRAE.from_pretrained(old))
    with pytest.raises(AssertionError):  # the two commits really differ, so the checks above can fail
        assert_same_vqrae(VQRAE.from_pretrained(old), VQRAE.from_pretrained(new))


@pytest.mark.parametrize("load", [VQRAE.from_pretrained, UnifiedModel.from_pretrained])
@pytest.mark.parametrize("revision", [None, "v2", COMMIT_B])
def test_unknown_id_offline_is_one_line(tmp_path, hub, load, revision):
    hub("someone/tiny-vqrae", write_vqrae(tmp_path / "vqrae"))
    name = "someone/tiny-vqrae" if revision else "nobody/nothing"  # a known repo at an unknown revision too
    with pytest.raises(FileNotFoundError) as err:
        load(name, revision=revision)
    msg = str(err.value)
    assert "\n" not in msg and "hub could not be reached" in msg and name in msg and (revision or "main") in msg


@pytest.mark.parametrize("name", ["./missing", "/no/such/dir", "outputs/run/model", "missing", "~/x", "a/b/"])
def test_missing_local_path_is_not_looked_up(tmp_path, monkeypatch, name):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a local path must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_lookup)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a hub id") as err:
        VQRAE.from_pretrained(name)
    assert "\n" not in str(err.value)


def test_hub_ids_and_paths_are_told_apart():
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("me/vqrae_siglip2.v1")
    for path in ("model", "./a/b", "/a/b", "a/b/c", "../a", "a/../b", "a/.b", "a--b/c", "C:\\x\\y"):
        assert not is_hub_id(path), path


def test_revision_of_a_local_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="hub ids only"):
        VQRAE.from_pretrained(write_vqrae(tmp_path / "vqrae"), revision="main")


def test_only_data_files_are_downloaded(monkeypatch, tmp_path):
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve("someone/model", "dev") == str(tmp_path)
    assert seen["repo_id"] == "someone/model" and seen["revision"] == "dev"
    fetched = lambda name: list(filter_repo_objects([name], allow_patterns=seen["allow_patterns"])) == [name]  # noqa: E731
    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "data.pkl", "modeling_x.py"):
        assert not fetched(name), name
    for name in ("model.safetensors", "vqrae/config.yaml", "mllm.yaml", "tokenizer/tokenizer.json", "README.md",
                 "tokenizer/merges.txt", "tokenizer/tokenizer.model", "tokenizer/chat_template.jinja"):
        assert fetched(name), name


def test_safety_checks_apply_to_snapshots(tmp_path, hub):
    folder = write_vqrae(tmp_path / "vqrae")
    config = os.path.join(folder, "config.yaml")
    with open(config) as f:
        data = yaml.safe_load(f)
    data["encoder"]["trust_remote_code"] = True
    with open(config, "w") as f:
        yaml.safe_dump(data, f)
    hub("someone/needs-code", folder)
    with pytest.raises(ConfigError, match="trust_remote_code"):
        VQRAE.from_pretrained("someone/needs-code")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(config, pickled / "config.yaml")
    torch.save({}, pickled / "pytorch_model.bin")
    hub("someone/pickled", pickled)
    with pytest.raises(ConfigError, match="pickle"):
        VQRAE.from_pretrained("someone/pickled")


def test_unified_by_hub_id_matches_directory(unified_dir, hub):
    hub("someone/tiny-unified", unified_dir)
    assert torch.equal(unified_logits(UnifiedModel.from_pretrained("someone/tiny-unified")),
                       unified_logits(UnifiedModel.from_pretrained(unified_dir)))


def test_build_reads_vqrae_from_hub_id(tmp_path, hub):
    folder = write_vqrae(tmp_path / "vqrae", seed=4)
    hub("someone/tiny-vqrae", folder)
    cfg = MLLMConfig(llm=write_llm(tmp_path / "llm", "qwen3"), vqrae="someone/tiny-vqrae", dtype="float32")
    assert_same_vqrae(UnifiedModel.build(cfg).vqrae, VQRAE.from_pretrained(folder))


# -- publishing ---------------------------------------------------------------------------------------------
def card_parts(folder) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md")).read()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def yaml_block(body: str) -> dict:
    return yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_prepare_upload_writes_model_and_card(tmp_path):
    run = tmp_path / "run"
    write_vqrae(run / "model")
    (run / "train_config.yaml").write_text(yaml.safe_dump({"data": {"source": "data/shapes/train"}}))
    (run / "model" / "metrics.json").write_text('{"psnr": 21.123456, "rfid": 3.5, "per_class": {"a": 1}}')
    folder = prepare_upload(VQRAE.from_pretrained(str(run / "model")).save_pretrained, str(tmp_path / "up"), "vqrae",
                            "me/tiny", run_dir=str(run / "model"))
    assert sorted(os.listdir(folder)) == ["README.md", "config.yaml", "model.safetensors"]
    front, body = card_parts(folder)
    assert front["library_name"] == "vqrae" and "image-tokenizer" in front["tags"]
    assert yaml_block(body) == yaml.safe_load(open(os.path.join(folder, "config.yaml")))
    assert "`data/shapes/train`" in body and "| psnr | 21.12 |" in body and "| rfid | 3.5 |" in body
    assert "per_class" not in body  # only scalar metrics make table rows
    assert 'from vqrae import VQRAE\nmodel = VQRAE.from_pretrained("me/tiny")' in body
    assert_same_vqrae(VQRAE.from_pretrained(folder), VQRAE.from_pretrained(str(run / "model")))


def test_card_without_run_info_and_bad_kind(tmp_path):
    write_model_card(str(tmp_path), "mllm", {"llm": "Qwen/Qwen3-0.6B"}, repo_id="me/m")
    front, body = card_parts(tmp_path)
    assert front["library_name"] == "vqrae" and "text-to-image" in front["tags"]
    assert "## Training data" not in body and "## Metrics" not in body
    assert 'UnifiedModel.from_pretrained("me/m")' in body and yaml_block(body) == {"llm": "Qwen/Qwen3-0.6B"}
    with pytest.raises(ValueError, match="kind"):
        write_model_card(str(tmp_path), "gan", {})


@pytest.fixture
def uploads(monkeypatch):
    """HfApi calls recorded instead of sent; ``upload_folder`` lists the folder while it still exists."""
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch",
                        lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw)))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs)
        calls.append(("upload_folder", repo_id, dict(kw, folder_path=folder_path, files=files,
                                                      card=card_parts(folder_path))))
        return "commit-info"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.parametrize("kind", ["vqrae", "mllm"])
def test_push_to_hub_uploads_a_loadable_folder(tmp_path, unified_dir, uploads, kind):
    model = VQRAE.from_pretrained(write_vqrae(tmp_path / "v")) if kind == "vqrae" else \
        UnifiedModel.from_pretrained(unified_dir)
    assert model.push_to_hub("me/tiny", revision="dev", private=True, commit_message="first") == "commit-info"
    (_, repo, create), (_, branch_repo, branch), (_, up_repo, up) = uploads
    assert repo == branch_repo == up_repo == "me/tiny"
    assert create["private"] is True and branch["branch"] == "dev"
    assert up["revision"] == "dev" and up["commit_message"] == "first"
    assert not os.path.exists(up["folder_path"])  # the temporary folder is gone after the upload
    main = "config.yaml" if kind == "vqrae" else "mllm.yaml"
    expected = {main, "README.md"} | ({"model.safetensors"} if kind == "vqrae" else
                                      {"projector.safetensors", "vqrae/model.safetensors", "llm/model.safetensors",
                                       "tokenizer/tokenizer.json"})
    assert expected <= set(up["files"])
    # every uploaded file is one a later from_pretrained(repo id) downloads: nothing the model needs is left out
    assert list(filter_repo_objects(up["files"], allow_patterns=ALLOW_PATTERNS)) == up["files"]
    front, body = up["card"]
    assert front["library_name"] == "vqrae" and body.count('.from_pretrained("me/tiny")') == 1


def test_push_to_hub_rejects_a_bad_repo_id(tmp_path, uploads):
    with pytest.raises(ValueError, match="owner/name"):
        VQRAE.from_pretrained(write_vqrae(tmp_path / "v")).push_to_hub("not a repo")
    assert uploads == []
