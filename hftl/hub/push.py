"""Push a finished run (an hftl output_dir) to the Hub in ONE commit: model or adapter, processor, results, card.

    from hftl.hub.push import push_run
    push_run("outputs/run", "user/my-model")            # CLI: hftl push outputs/run user/my-model

Layout in the repo:
- merged / full-model runs: the model folder at the root (plain `pipeline(model=repo)` loads it); a LoRA run's adapter
  too, under `adapter/`;
- adapter-only runs (`--merge_lora false`): the PEFT adapter at the root, plus the fine-tuned config.json (labels)
  and the image processor;
- always: README.md (model card), a scrubbed all_results.json, and the test artefacts (confusion matrix, sample PNG).
checkpoints/ and tensorboard logs stay local. The token comes from the argument, $HF_TOKEN or `hf auth login`; it is
checked (whoami) before anything is uploaded and never written anywhere. One commit is atomic on the server: a failed
push leaves the repo at its previous revision, and the error names the command to rerun.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path, PurePath

from hftl.hub.card import build_model_card, is_hub_id
from hftl.outputs import ADAPTER_DIR, RESULTS_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin")
ROOT_SUFFIXES = (".json", ".safetensors", ".bin", ".png", ".jpg", ".txt")
# config keys that only ever hold paths on the training machine
_PATH_KEYS = ("output_dir", "resume_from_checkpoint", "logging_dir", "cache_dir")
RETRIES = 4
BACKOFF_SECONDS = 1.0  # doubled after each failed attempt


class PushError(RuntimeError):
    """A push that did not happen; the message says why and what to rerun."""


def _looks_like_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))


def scrub(value, key: str | None = None):
    """JSON-like data with local paths reduced to their last component and path-only keys removed."""
    if isinstance(value, dict):
        return {k: scrub(v, k) for k, v in value.items() if k not in _PATH_KEYS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and _looks_like_local_path(value):
        return PurePath(value).name
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PushError(f"Cannot read {path}: {error}") from error


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(("optimizer", "scheduler", "adapter_"))
        for p in folder.iterdir()
    )


def _folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Top-level files of a model/adapter folder worth pushing; JSON is scrubbed of local paths."""
    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix not in ROOT_SUFFIXES or path.name == RESULTS_FILE:
            continue
        if path.suffix == ".json":
            files[prefix + path.name] = _json_bytes(scrub(_read_json(path)))
        else:
            files[prefix + path.name] = path.read_bytes()
    return files


def _adapter_config_json(adapter_dir: Path, base_model: str | None) -> bytes:
    config = _read_json(adapter_dir / "adapter_config.json")
    if base_model:
        config["base_model_name_or_path"] = base_model
    return _json_bytes(scrub(config))


def _finetuned_config(base_model: str, labels: list[str]) -> bytes:
    """For adapter-only runs: the base config with the run's labels, so the adapter's head shape is known."""
    from transformers import AutoConfig

    from hftl.bundled import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(base_model))
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.num_labels = len(labels)
    return _json_bytes(scrub(config.to_dict()))


def collect_files(output_dir: str | Path, repo_id: str, license: str = "apache-2.0") -> dict[str, bytes]:
    """Everything one push uploads, as {path in repo: bytes}; raises PushError when output_dir is not a run."""
    out = Path(output_dir)
    if not (out / RESULTS_FILE).is_file():
        raise PushError(f"{out} is not a finished hftl run: {RESULTS_FILE} is missing (train first: hftl train ...).")
    raw = _read_json(out / RESULTS_FILE)
    base_model = raw.get("model") if is_hub_id(raw.get("model")) else None
    dataset = raw.get("dataset") if is_hub_id(raw.get("dataset")) else None
    results = scrub(raw)
    adapter_dir = out / ADAPTER_DIR
    has_adapter = (adapter_dir / "adapter_config.json").is_file()
    adapter_only = has_adapter and not _has_weights(out)
    if not has_adapter and not _has_weights(out):
        raise PushError(f"{out} holds neither model weights (config.json + *.safetensors) nor an adapter/ folder.")
    if adapter_only and base_model is None:
        raise PushError(
            f"{out} holds a LoRA adapter on the local model {raw.get('model')!r}, which no one else can load. "
            "Push the base model to the Hub and train from its repo id, or train with --merge_lora true."
        )

    files: dict[str, bytes] = {}
    if adapter_only:
        files.update(_folder_files(adapter_dir))
        files["adapter_config.json"] = _adapter_config_json(adapter_dir, base_model)
        if "config.json" not in files:
            files["config.json"] = _finetuned_config(base_model, results.get("labels") or [])
    else:
        files.update(_folder_files(out))
        if has_adapter:
            files.update(_folder_files(adapter_dir, f"{ADAPTER_DIR}/"))
            files[f"{ADAPTER_DIR}/adapter_config.json"] = _adapter_config_json(adapter_dir, base_model)
    # test artefacts from the run folder (confusion matrix, detection / segmentation sample PNGs)
    for path in sorted(out.iterdir()):
        if path.is_file() and path.suffix in (".png", ".jpg") and path.name not in files:
            files[path.name] = path.read_bytes()
    files[RESULTS_FILE] = _json_bytes(results)
    images = sorted(name for name in files if "/" not in name and name.endswith((".png", ".jpg")))
    card = build_model_card(
        results,
        repo_id,
        adapter_only=adapter_only,
        base_model=base_model,
        dataset=dataset,
        images=images,
        license=license,
        model_type=json.loads(files["config.json"]).get("model_type") if adapter_only else None,
    )
    files["README.md"] = str(card).encode()
    _add_exports(files, out, repo_id)
    return files


def _add_exports(files: dict[str, bytes], out: Path, repo_id: str) -> None:
    """`hftl export` folders of the run (onnx/, openvino/) and their Deploy section in the card."""
    from hftl.export.deploy import deploy_section, export_files, export_reports, with_deploy

    reports = export_reports(out)
    if reports:
        for name, data in export_files(out).items():
            files[name] = _json_bytes(scrub(json.loads(data))) if name.endswith(".json") else data
        files["README.md"] = with_deploy(files["README.md"].decode(), deploy_section(reports, repo_id)).encode()


def _secrets_check(files: dict[str, bytes], token: str | None, output_dir: Path) -> None:
    """Last line of defence: nothing pushed may hold the token or this machine's paths."""
    forbidden = [str(output_dir.resolve()), str(Path.home())]
    for name, content in files.items():
        if token and token.encode() in content:
            raise PushError(f"Refusing to push: {name} contains the Hub token. Nothing was uploaded.")
        if name.endswith((".json", ".md", ".txt")):
            text = content.decode("utf-8", "replace")
            for path in forbidden:
                if path not in ("/", "") and path in text:
                    raise PushError(f"Refusing to push: {name} contains the local path {path}. Nothing was uploaded.")


def _is_transient(error: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(error, httpx2.TransportError | ConnectionError | TimeoutError)


def _with_retries(action, what: str, rerun: str, retries: int = RETRIES):
    for attempt in range(1, retries + 1):
        try:
            return action()
        except PushError:
            raise
        except Exception as error:
            if not _is_transient(error):
                from huggingface_hub.errors import HfHubHTTPError

                if isinstance(error, HfHubHTTPError):
                    raise PushError(f"{what} failed: {error}. Fix the cause, then rerun: {rerun}") from error
                raise
            if attempt == retries:
                raise PushError(
                    f"{what} failed after {retries} attempts ({type(error).__name__}: {error}). Nothing was "
                    f"committed: the repo is still at its previous revision. Rerun: {rerun}"
                ) from error
            time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))


def check_token(api) -> str | None:
    """Who the token belongs to; a PushError before any upload when the Hub rejects it, or when there is none and the
    endpoint is huggingface.co (a local `hftl hub serve` without a token accepts anonymous pushes: None)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.whoami()["name"]
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise PushError(
                f"The Hub at {api.endpoint} rejected the token (HTTP {status}). Set a valid one in HF_TOKEN "
                "or run `hf auth login`. Nothing was uploaded."
            ) from error
        raise
    except OSError as error:  # LocalTokenNotFoundError and the like: no token at all
        if "token" in str(error).lower():
            if api.endpoint.rstrip("/") != constants._HF_DEFAULT_ENDPOINT:
                return None  # a local endpoint may run without tokens; it answers 401 itself if it needs one
            raise PushError(
                f"No Hub token: set HF_TOKEN or run `hf auth login` (endpoint {api.endpoint}). Nothing was uploaded."
            ) from error
        raise


def push_run(
    output_dir: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    license: str = "apache-2.0",
    token: str | None = None,
    commit_message: str | None = None,
    retries: int = RETRIES,
    endpoint: str | None = None,
) -> str:
    """Pushes the run in `output_dir` to `repo_id` (created if missing; `revision` branch created if missing) in
    one commit and returns the repo URL. Unchanged files are skipped by the client, so a second push of the same run
    adds nothing. `endpoint` defaults to $HF_ENDPOINT (huggingface.co)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    out = Path(output_dir)
    rerun = "hftl push " + shlex.join([str(out), repo_id])
    rerun += (f" --revision {shlex.quote(revision)}" if revision else "") + (
        f" --endpoint {endpoint}" if endpoint else ""
    )
    files = collect_files(out, repo_id, license)  # fails on a bad folder before any network traffic
    api = HfApi(endpoint=endpoint, token=token)
    resolved_token = token or api.token or _stored_token()
    _secrets_check(files, resolved_token, out)
    _with_retries(lambda: check_token(api), f"Reaching the Hub at {api.endpoint}", rerun, retries)

    url = _with_retries(
        lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"Creating {repo_id}", rerun, retries
    )
    if revision:
        _with_retries(
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
            f"Creating branch {revision}",
            rerun,
            retries,
        )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
    message = commit_message or f"hftl: {_summary(files)}"
    _with_retries(
        lambda: api.create_commit(repo_id, operations, commit_message=message, revision=revision),
        f"Pushing {out} to {repo_id}",
        rerun,
        retries,
    )
    return str(url)


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token() or os.environ.get("HF_TOKEN")


def _summary(files: dict[str, bytes]) -> str:
    try:
        results = json.loads(files[RESULTS_FILE])
    except (KeyError, ValueError):
        return "push run"
    metric = results.get("metric_for_best")
    value = (results.get("test") or {}).get(metric)
    score = f", test {metric} {value:.4f}" if isinstance(value, float) else ""
    return f"{results.get('task')} / {results.get('strategy')}{score}"
