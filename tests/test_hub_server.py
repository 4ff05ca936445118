"""The local Hub endpoint, driven by the real huggingface_hub client, transformers and datasets over 127.0.0.1."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hftl.hub.serving import start_in_thread

pytestmark = pytest.mark.integration  # a live server on 127.0.0.1

BIG = 11 * 1024 * 1024  # above 10 MB: the size that goes through LFS on the real Hub


def _auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]


def _commit_raw(hub, repo_id: str, lines: list[dict], repo_type: str = "models") -> httpx.Response:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return httpx.post(
        f"{hub.url}/api/{repo_type}/{repo_id}/commit/main",
        content=body,
        headers={**_auth(hub.token), "Content-Type": "application/x-ndjson"},
    )


def _header(summary: str = "raw commit") -> dict:
    return {"key": "header", "value": {"summary": summary, "description": ""}}


def _file_line(path: str, data: bytes) -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"}}


@pytest.fixture(scope="module")
def open_hub(tmp_path_factory):
    """A second server: anonymous reads allowed for public repos (private ones answer 404)."""
    handle = start_in_thread(tmp_path_factory.mktemp("open-hub"), token="test-token-open", anonymous_read=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def lfs_hub(tmp_path_factory):
    """A server answering uploadMode "lfs" for every non-empty file; its clients need HF_HUB_DISABLE_XET=1."""
    handle = start_in_thread(tmp_path_factory.mktemp("lfs-hub"), token="test-token-lfs", lfs_threshold=0)
    yield handle
    handle.stop()


def _run_client(hub, script: str) -> str:
    """Run `script` in a fresh interpreter whose huggingface_hub talks to `hub` with Xet disabled.

    HF_ENDPOINT and HF_HUB_DISABLE_XET are read when huggingface_hub is imported, hence the subprocess."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_model_repo_push_pull_roundtrip(local_hub, hub_repo_id, tmp_path):
    api = local_hub.api()
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(4096))

    url = api.create_repo(hub_repo_id)
    assert url == f"{local_hub.url}/{hub_repo_id}"
    assert api.create_repo(hub_repo_id, exist_ok=True) == url  # 409 body carries the url
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(hub_repo_id)
    assert conflict.value.response.status_code == 409
    assert api.list_repo_files(hub_repo_id) == [".gitattributes"]  # initial commit: main exists at once

    commit = api.upload_folder(folder_path=folder, repo_id=hub_repo_id, commit_message="add model")
    info = api.model_info(hub_repo_id, files_metadata=True)
    assert info.sha == commit.oid
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "config.json", "sub/weights.bin"]
    assert {s.rfilename: s.size for s in info.siblings}["sub/weights.bin"] == 4096
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(hub_repo_id, recursive=True)}
    assert tree == {
        ".gitattributes": "RepoFile",
        "config.json": "RepoFile",
        "sub": "RepoFolder",
        "sub/weights.bin": "RepoFile",
    }
    assert api.file_exists(hub_repo_id, "sub/weights.bin") and not api.file_exists(hub_repo_id, "nope.bin")
    assert [c.title for c in api.list_repo_commits(hub_repo_id)] == ["add model", "initial commit"]

    path = hf_hub_download(hub_repo_id, "sub/weights.bin", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == (folder / "sub" / "weights.bin").read_bytes()
    snapshot = Path(snapshot_download(hub_repo_id, cache_dir=tmp_path / "cache2"))
    assert (snapshot / "config.json").read_text() == '{"a": 1}'
    assert snapshot.name == commit.oid

    api.delete_repo(hub_repo_id)
    assert not api.repo_exists(hub_repo_id)


def test_dataset_and_space_repos(local_hub, hub_repo_id, tmp_path):
    api = local_hub.api()
    api.create_repo(hub_repo_id, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"x,y\n1,2\n", path_in_repo="data/train.csv", repo_id=hub_repo_id, repo_type="dataset"
    )
    assert api.dataset_info(hub_repo_id).id == hub_repo_id
    path = hf_hub_download(hub_repo_id, "data/train.csv", repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"x,y\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_repo_id)  # same id, other repo type

    api.create_repo(hub_repo_id, repo_type="space", space_sdk="gradio")
    api.upload_file(path_or_fileobj=b"import gradio\n", path_in_repo="app.py", repo_id=hub_repo_id, repo_type="space")
    space = api.space_info(hub_repo_id)
    assert space.sdk == "gradio" and "app.py" in [s.rfilename for s in space.siblings]
    assert api.list_repo_files(hub_repo_id, repo_type="space") == [".gitattributes", "app.py"]

    # legacy id without namespace belongs to the server's user
    legacy = hub_repo_id.split("/")[1] + "-legacy"
    assert api.create_repo(legacy).repo_id == f"{local_hub.user}/{legacy}"
    assert api.model_info(legacy).id == f"{local_hub.user}/{legacy}"


def test_big_file_regular_upload_and_range(local_hub, hub_repo_id, tmp_path):
    api = local_hub.api()
    api.create_repo(hub_repo_id)
    data = os.urandom(BIG)
    api.upload_file(path_or_fileobj=data, path_in_repo="model.safetensors", repo_id=hub_repo_id)
    path = hf_hub_download(hub_repo_id, "model.safetensors", cache_dir=tmp_path)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()

    head = httpx.head(f"{local_hub.url}/{hub_repo_id}/resolve/main/model.safetensors", headers=_auth(local_hub.token))
    assert head.headers["X-Repo-Commit"] == api.model_info(hub_repo_id).sha
    assert head.headers["Content-Length"] == str(BIG)
    part = httpx.get(
        f"{local_hub.url}/{hub_repo_id}/resolve/main/model.safetensors",
        headers={**_auth(local_hub.token), "Range": "bytes=100-199"},
    )
    assert part.status_code == 206 and part.content == data[100:200]


def test_big_file_through_classic_lfs_in_subprocess(lfs_hub, tmp_path):
    api = HfApi(endpoint=lfs_hub.url, token=lfs_hub.token)
    repo_id = "hftl/lfs-model"
    api.create_repo(repo_id)
    data = os.urandom(BIG)
    (tmp_path / "weights.bin").write_bytes(data)
    _run_client(
        lfs_hub,
        f"""
        from huggingface_hub import HfApi
        for _ in range(2):  # the second push finds the object present and commits nothing
            HfApi().upload_file(path_or_fileobj={str(tmp_path / "weights.bin")!r}, path_in_repo="weights.bin",
                                repo_id={repo_id!r})
        """,
    )
    entry = next(e for e in api.list_repo_tree(repo_id) if e.path == "weights.bin")
    assert entry.lfs is not None and entry.lfs.sha256 == hashlib.sha256(data).hexdigest() and entry.size == BIG
    head = httpx.head(f"{lfs_hub.url}/{repo_id}/resolve/main/weights.bin", headers=_auth(lfs_hub.token))
    assert head.headers["X-Linked-Etag"].strip('"') == entry.lfs.sha256
    assert head.headers["X-Linked-Size"] == str(BIG)
    path = hf_hub_download(repo_id, "weights.bin", cache_dir=tmp_path / "c", endpoint=lfs_hub.url, token=lfs_hub.token)
    assert Path(path).read_bytes() == data
    assert [c.title for c in api.list_repo_commits(repo_id)] == [
        "Upload weights.bin with huggingface_hub",
        "initial commit",
    ]


def test_xet_client_gets_actionable_501(lfs_hub):
    """A client with Xet enabled (the default; tests/conftest.py turns it off in this process, so a subprocess)
    cannot upload "lfs" files here; the repo is untouched and the server's error says what to do."""
    HfApi(endpoint=lfs_hub.url, token=lfs_hub.token).create_repo("hftl/xet-client")
    script = (
        "from huggingface_hub import HfApi\n"
        "try:\n"
        "    HfApi().upload_file(path_or_fileobj=b'weights', path_in_repo='w.bin', repo_id='hftl/xet-client')\n"
        "    print('UPLOADED')\n"
        "except Exception as error:\n"
        "    print('FAILED', type(error).__name__, error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env.update(HF_ENDPOINT=lfs_hub.url, HF_TOKEN=lfs_hub.token)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("FAILED") and "501" in out and "xet-write-token" in out, out
    api = HfApi(endpoint=lfs_hub.url, token=lfs_hub.token)
    assert api.list_repo_files("hftl/xet-client") == [".gitattributes"]
    answer = httpx.get(f"{lfs_hub.url}/api/models/hftl/xet-client/xet-write-token/main", headers=_auth(lfs_hub.token))
    assert answer.status_code == 501 and "HF_HUB_DISABLE_XET=1" in answer.json()["error"]


def test_lfs_upload_url_needs_its_signature(open_hub):
    oid = "0" * 64
    answer = httpx.put(f"{open_hub.url}/hftl-lfs/upload/{oid}?size=3&sig=forged", content=b"abc")
    assert answer.status_code == 403 and "signature" in answer.json()["error"]


def test_transformers_from_pretrained_and_pipeline(local_hub, hub_repo_id, tiny_vit_dir, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTForImageClassification,
        ViTImageProcessor,
        pipeline,
    )

    ViTForImageClassification.from_pretrained(tiny_vit_dir).push_to_hub(hub_repo_id)
    ViTImageProcessor.from_pretrained(tiny_vit_dir).push_to_hub(hub_repo_id)  # second push: repo exists (409 url)

    model = AutoModelForImageClassification.from_pretrained(hub_repo_id, cache_dir=tmp_path)
    processor = AutoImageProcessor.from_pretrained(hub_repo_id, cache_dir=tmp_path)
    assert model.config.hidden_size == 32 and model.config.id2label == {0: "blue", 1: "red"}
    assert processor.size == {"height": 32, "width": 32}
    image = Image.fromarray(np.full((40, 40, 3), (200, 30, 30), dtype=np.uint8))
    predictions = pipeline("image-classification", model=hub_repo_id)(image)
    assert {p["label"] for p in predictions} == {"blue", "red"}
    assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-4


def test_datasets_push_to_hub_and_load_dataset(lfs_hub):
    """Dataset.push_to_hub preuploads each parquet shard and deletes it before the commit, so shards must travel
    as LFS: a server with lfs_threshold and a client with HF_HUB_DISABLE_XET=1 (a Xet client cannot do it)."""
    out = _run_client(
        lfs_hub,
        """
        import json, numpy as np
        from datasets import ClassLabel, Dataset, Features, Image, load_dataset
        from PIL import Image as PILImage

        images = [PILImage.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 100, 200)]
        features = Features({"image": Image(), "label": ClassLabel(names=["blue", "red"])})
        Dataset.from_dict({"image": images, "label": [0, 1, 1]}, features=features).push_to_hub("hftl/tiny-ds")
        train = load_dataset("hftl/tiny-ds")["train"]
        print(json.dumps({"names": train.features["label"].names, "labels": list(train["label"]),
                          "mean": float(np.asarray(train[1]["image"]).mean())}))
        """,
    )
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded == {"names": ["blue", "red"], "labels": [0, 1, 1], "mean": 100.0}
    files = HfApi(endpoint=lfs_hub.url, token=lfs_hub.token).list_repo_tree(
        "hftl/tiny-ds", recursive=True, repo_type="dataset"
    )
    assert {f.path.rsplit(".", 1)[-1] for f in files if getattr(f, "lfs", None)} == {"parquet", "md"}


def test_hub_dataset_cache_holds_small_images_in_few_record_batches(lfs_hub, tmp_path):
    """hftl's load of a Hub id sizes the Arrow cache's record batches from the card's split sizes (push_to_hub writes
    them): datasets' default of 100 rows a batch put a header on every 64 KB of small images' cache, and all of it
    in RSS. Same rows and labels as datasets' own load."""
    out = _run_client(
        lfs_hub,
        f"""
        import hashlib, json
        import numpy as np
        from datasets import ClassLabel, Dataset, Features, Image, load_dataset
        from PIL import Image as PILImage
        from hftl.config import DataArgs
        from hftl.data import load_dataset_dict
        from hftl.tasks.classification.task import ClassificationTask

        rng = np.random.default_rng(0)
        images = [PILImage.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(350)]
        features = Features({{"image": Image(), "label": ClassLabel(names=["a", "b", "c"])}})
        pushed = Dataset.from_dict({{"image": images, "label": [i % 3 for i in range(350)]}}, features=features)
        pushed.push_to_hub("hftl/small-images")

        def described(train):
            raw = train.cast_column("image", Image(decode=False))
            digest = hashlib.sha256(b"".join(item["bytes"] for item in raw["image"])).hexdigest()
            return {{"batches": [len(batch) for batch in train.data.to_batches()], "images": digest,
                     "labels": list(train["label"])}}

        default = load_dataset("hftl/small-images", cache_dir={str(tmp_path / "default")!r})["train"]
        hftl = load_dataset_dict(DataArgs(dataset="hftl/small-images"), ClassificationTask())["train"]
        print(json.dumps({{"default": described(default), "hftl": described(hftl)}}))
        """,
    )
    loaded = json.loads(out.strip().splitlines()[-1])
    assert loaded["default"]["batches"] == [100, 100, 100, 50]  # datasets' default for images
    assert loaded["hftl"]["batches"] == [350]
    assert loaded["hftl"]["images"] == loaded["default"]["images"]
    assert loaded["hftl"]["labels"] == loaded["default"]["labels"] == [i % 3 for i in range(350)]


def test_load_dataset_through_hf_endpoint(local_hub, hub_repo_id, tmp_path):
    """hftl.data calls load_dataset("user/name") with HF_ENDPOINT set: parquet + README uploaded in regular mode."""
    from datasets import Dataset, load_dataset

    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    Dataset.from_dict({"x": [1, 2, 3], "y": ["a", "b", "c"]}).to_parquet(
        folder / "data" / "train-00000-of-00001.parquet"
    )
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    local_hub.api().create_repo(hub_repo_id, repo_type="dataset")
    local_hub.api().upload_folder(folder_path=folder, repo_id=hub_repo_id, repo_type="dataset")
    assert local_hub.api().dataset_info(hub_repo_id).card_data["license"] == "mit"
    loaded = load_dataset(hub_repo_id, cache_dir=str(tmp_path / "cache"))
    assert list(loaded["train"]["x"]) == [1, 2, 3] and list(loaded["train"]["y"]) == ["a", "b", "c"]


def test_token_required(local_hub, hub_repo_id):
    local_hub.api().create_repo(hub_repo_id)
    anonymous = httpx.get(f"{local_hub.url}/api/models/{hub_repo_id}")
    assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["error"]
    wrong = httpx.get(f"{local_hub.url}/api/models/{hub_repo_id}", headers=_auth("wrong-token"))
    assert (
        wrong.status_code == 401 and wrong.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    )
    with pytest.raises(HfHubHTTPError) as error:
        local_hub.api(token="wrong-token").create_repo(hub_repo_id + "-x")
    assert error.value.response.status_code == 401
    assert local_hub.api().whoami()["name"] == local_hub.user


def test_private_repo_invisible_without_token(open_hub, tmp_path):
    api = HfApi(endpoint=open_hub.url, token=open_hub.token)
    anonymous = HfApi(endpoint=open_hub.url, token=False)
    api.create_repo("hftl/public-one")
    api.create_repo("hftl/secret-one", private=True)
    for repo_id in ("hftl/public-one", "hftl/secret-one"):
        api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id=repo_id)

    assert anonymous.model_info("hftl/public-one").private is False
    answer = httpx.get(f"{open_hub.url}/hftl/secret-one/resolve/main/a.txt")
    assert answer.status_code == 404 and answer.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("hftl/secret-one")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("hftl/secret-one", "a.txt", endpoint=open_hub.url, token=False, cache_dir=tmp_path)
    assert api.model_info("hftl/secret-one").private is True
    assert httpx.post(f"{open_hub.url}/api/repos/create", json={"name": "x"}).status_code == 401  # writes need it


@pytest.mark.parametrize("bad_path", ["../escape.txt", "a/../../escape.txt", "/etc/evil", "a\\b.txt", ".git/config"])
def test_commit_path_outside_repo_rejected(local_hub, hub_repo_id, bad_path):
    api = local_hub.api()
    api.create_repo(hub_repo_id)
    before = api.model_info(hub_repo_id).sha
    answer = _commit_raw(local_hub, hub_repo_id, [_header(), _file_line("ok.txt", b"ok"), _file_line(bad_path, b"x")])
    assert answer.status_code == 400
    assert "Invalid path in commit" in answer.json()["error"] and repr(bad_path) in answer.json()["error"]
    assert api.model_info(hub_repo_id).sha == before
    assert not (local_hub.data_dir.parent / "escape.txt").exists()


def test_parent_commit_mismatch_is_412(local_hub, hub_repo_id):
    from huggingface_hub import CommitOperationAdd

    api = local_hub.api()
    api.create_repo(hub_repo_id)
    first = api.model_info(hub_repo_id).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=hub_repo_id)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(hub_repo_id, [CommitOperationAdd("b.txt", b"2")], commit_message="late", parent_commit=first)
    assert error.value.response.status_code == 412
    head = api.model_info(hub_repo_id).sha
    api.create_commit(hub_repo_id, [CommitOperationAdd("b.txt", b"2")], commit_message="ok", parent_commit=head)
    assert api.list_repo_files(hub_repo_id) == [".gitattributes", "a.txt", "b.txt"]


def test_failed_commits_leave_repo_unchanged(local_hub, hub_repo_id):
    api = local_hub.api()
    api.create_repo(hub_repo_id)
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=hub_repo_id)
    before = api.model_info(hub_repo_id).sha

    missing_lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 5}}
    answer = _commit_raw(local_hub, hub_repo_id, [_header(), _file_line("a.txt", b"v2"), missing_lfs])
    assert answer.status_code == 400 and "never uploaded" in answer.json()["error"]

    # a client that dies mid-body: the server must not apply the half-received commit
    body = (json.dumps(_header()) + "\n" + json.dumps(_file_line("a.txt", b"v3")) + "\n").encode()
    with socket.create_connection(("127.0.0.1", int(local_hub.url.rsplit(":", 1)[1]))) as sock:
        request = (
            f"POST /api/models/{hub_repo_id}/commit/main HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {local_hub.token}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {len(body) + 100000}\r\n\r\n"
        )
        sock.sendall(request.encode() + body)
    time.sleep(0.3)  # let the server notice the disconnect before looking
    assert api.model_info(hub_repo_id).sha == before
    path = hf_hub_download(hub_repo_id, "a.txt", force_download=True)
    assert Path(path).read_bytes() == b"v1"


def test_branch_tag_and_download_by_revision(local_hub, hub_repo_id):
    api = local_hub.api()
    api.create_repo(hub_repo_id)
    v1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=hub_repo_id).oid
    api.create_tag(hub_repo_id, tag="v1.0")
    api.create_branch(hub_repo_id, branch="feature/x")  # slash: travels as feature%2Fx in the raw path
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=hub_repo_id, revision="feature/x")
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=hub_repo_id)

    def read(revision):
        return Path(hf_hub_download(hub_repo_id, "f.txt", revision=revision)).read_bytes()

    assert (read("main"), read("v1.0"), read("feature/x"), read(v1)) == (b"v2", b"v1", b"dev", b"v1")
    refs = api.list_repo_refs(hub_repo_id)
    assert {b.name for b in refs.branches} == {"main", "feature/x"} and [t.name for t in refs.tags] == ["v1.0"]
    with pytest.raises(HfHubHTTPError) as error:
        api.create_branch(hub_repo_id, branch="feature/x")
    assert error.value.response.status_code == 409
    api.create_branch(hub_repo_id, branch="feature/x", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, "f.txt", revision="no-such-branch")
    with pytest.raises(HfHubHTTPError, match="create_branch"):
        api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=hub_repo_id, create_pr=True)


def test_identical_files_are_stored_once(local_hub, tmp_path):
    api = local_hub.api()
    folder = tmp_path / "same"
    folder.mkdir()
    (folder / "w.bin").write_bytes(os.urandom(50_000))
    (folder / "c.json").write_text(json.dumps({"unique": tmp_path.name}))
    first, second = local_hub.repo_id("dedupe-a"), local_hub.repo_id("dedupe-b")
    api.create_repo(first)
    api.create_repo(second)
    api.upload_folder(folder_path=folder, repo_id=first)
    blobs_before = _blob_files(local_hub.data_dir)
    commits_before = len(api.list_repo_commits(first))
    api.upload_folder(folder_path=folder, repo_id=first)  # unchanged: the client skips it (preupload oid)
    api.upload_folder(folder_path=folder, repo_id=second)  # same bytes in another repo
    assert _blob_files(local_hub.data_dir) == blobs_before
    assert len(api.list_repo_commits(first)) == commits_before
    assert api.list_repo_files(second) == [".gitattributes", "c.json", "w.bin"]
    assert not list((local_hub.data_dir / "tmp").iterdir())  # no partial uploads left behind


def test_missing_things_have_error_codes(local_hub, hub_repo_id):
    api = local_hub.api()
    missing = httpx.get(f"{local_hub.url}/api/models/{hub_repo_id}", headers=_auth(local_hub.token))
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "RepoNotFound"
    assert "error" in missing.json()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id, "x.txt")
    api.create_repo(hub_repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(hub_repo_id, "x.txt")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(hub_repo_id, revision="nope")


def test_body_size_limit(tmp_path):
    handle = start_in_thread(tmp_path / "hub", max_body_bytes=1024)
    try:
        api = HfApi(endpoint=handle.url, token="any")
        api.create_repo("hftl/small")
        with pytest.raises(HfHubHTTPError) as error:
            api.upload_file(path_or_fileobj=os.urandom(4096), path_in_repo="big.bin", repo_id="hftl/small")
        assert error.value.response.status_code == 413
        assert api.list_repo_files("hftl/small") == [".gitattributes"]
    finally:
        handle.stop()


def test_listing_and_search_with_private_repos_for_their_owner_only(open_hub):
    """What HfApi.list_models/list_datasets/list_spaces and the `hf` CLI call: GET /api/models|datasets|spaces."""
    api = HfApi(endpoint=open_hub.url, token=open_hub.token)
    anonymous = HfApi(endpoint=open_hub.url, token=False)
    api.create_repo("lister/cats-vit")
    api.create_repo("lister/cats-secret", private=True)
    api.create_repo("other/dogs-vit")
    api.create_repo("lister/cats-data", repo_type="dataset")
    api.create_repo("lister/cats-demo", repo_type="space", space_sdk="gradio")
    card = "---\npipeline_tag: image-classification\ntags: [vision]\n---\n# cats\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id="lister/cats-vit")

    def ids(listing):
        return sorted(item.id for item in listing)

    assert ids(api.list_models(search="cats")) == ["lister/cats-secret", "lister/cats-vit"]
    assert ids(anonymous.list_models(search="cats")) == ["lister/cats-vit"]  # private: only for its owner
    assert ids(api.list_models(author="other")) == ["other/dogs-vit"]
    assert ids(api.list_models(search="VIT")) == ["lister/cats-vit", "other/dogs-vit"]
    assert len(list(api.list_models(author="lister", limit=1))) == 1
    assert ids(api.list_models(filter="vision")) == ["lister/cats-vit"]
    (listed,) = api.list_models(search="cats-vit")
    assert listed.pipeline_tag == "image-classification" and listed.private is False
    assert ids(api.list_datasets(author="lister")) == ["lister/cats-data"]
    assert ids(api.list_spaces(search="cats")) == ["lister/cats-demo"]
    assert httpx.get(f"{open_hub.url}/api/models", headers=_auth("wrong")).status_code == 401
