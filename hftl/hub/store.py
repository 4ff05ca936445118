"""On-disk storage for the local Hub endpoint: content-addressed blobs, repos, commits and refs.

Layout under ``data_dir``::

    blobs/<sha256[:2]>/<sha256>            file contents, named by their SHA-256 (identical files stored once)
    tmp/                                   partial uploads; same filesystem, so os.replace is atomic
    repos/<type>s/<namespace>/<name>/
        repo.json                          {id, type, private, sdk, createdAt}
        refs.json                          {"branches": {name: commit}, "tags": {name: commit}}
        commits/<commit>.json              {id, parents, title, message, date, author, files: {path: entry}}

A commit file holds the full file manifest of its tree (entry = {sha256, sha1, size, lfs}). A commit becomes
visible only when ``refs.json`` is swapped with ``os.replace`` after its blobs and commit file are on disk, so a
commit that fails half-way leaves the repo exactly as it was.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO_TYPES = ("model", "dataset", "space")
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_REF_RE = re.compile(r"^(?!refs/)[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")  # branch/tag names; "/" allowed, not ".."
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz"
        " *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar"
        " *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents* *.png *.jpg *.jpeg *.webp"
    ).split()
)


class HubError(Exception):
    """An error the server turns into a JSON answer with X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(entry: dict) -> bytes:
    return _LFS_POINTER.format(sha256=entry["sha256"], size=entry["size"]).encode()


def entry_oid(entry: dict) -> str:
    """The git blob id a real Hub reports: of the content, or of the LFS pointer for LFS files."""
    return git_blob_sha1(lfs_pointer(entry)) if entry["lfs"] else entry["sha1"]


def validate_repo_path(path: object) -> str:
    """Reject any commit path that could escape the repo or the store; the message names the path and the rule."""
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid path in commit: {path!r} (expected a non-empty string)", "InvalidPath")
    if "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in commit: {path!r} (backslashes and NUL bytes are not allowed)")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise HubError(400, f"Invalid path in commit: {path!r} (paths must be relative to the repo root)")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in commit: {path!r} (no '..', '.' or empty segments allowed)")
    if parts[0] == ".git":
        raise HubError(400, f"Invalid path in commit: {path!r} (.git/ is reserved)")
    return path


def split_repo_id(repo_id: str, default_namespace: str) -> tuple[str, str]:
    """`name` (legacy, no namespace) belongs to the server's user; both parts are checked before touching disk."""
    parts = repo_id.split("/")
    if len(parts) == 1:
        parts = [default_namespace, parts[0]]
    if len(parts) != 2 or not all(_NAME_RE.match(p) and ".." not in p for p in parts) or parts[1].endswith(".git"):
        raise HubError(
            400, f"Invalid repo id {repo_id!r}: expected 'namespace/name' of letters, digits, '-', '_', '.'"
        )
    return parts[0], parts[1]


class Store:
    def __init__(self, data_dir: str | os.PathLike, default_namespace: str = "hftl"):
        self.root = Path(data_dir).resolve()
        self.default_namespace = default_namespace
        self.blobs, self.tmp, self.repos = self.root / "blobs", self.root / "tmp", self.root / "repos"
        for folder in (self.blobs, self.tmp, self.repos):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # serialises ref swaps so parentCommit checks cannot race

    # ---------- small atomic file helpers ----------
    def _write_json(self, path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def new_tmp_path(self) -> Path:
        return self.tmp / f"upload-{uuid.uuid4().hex}"

    # ---------- blobs ----------
    def blob_path(self, sha256: str) -> Path:
        assert _SHA256_RE.match(sha256), sha256
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
            return False
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def adopt_blob(self, tmp_file: Path, sha256: str) -> None:
        """Move a fully written, hash-checked temp file into the store (or drop it: identical content exists)."""
        target = self.blob_path(sha256)
        if target.exists():
            tmp_file.unlink(missing_ok=True)
            return
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp_file, target)

    def put_bytes(self, data: bytes) -> dict:
        """Store `data`; return its manifest entry (without the lfs flag)."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha256, len(data)):
            tmp = self.new_tmp_path()
            tmp.write_bytes(data)
            self.adopt_blob(tmp, sha256)
        return {"sha256": sha256, "sha1": git_blob_sha1(data), "size": len(data)}

    def blob_entry(self, sha256: str) -> dict:
        """Entry of an already stored blob (an LFS upload): the git sha1 is computed once, streaming."""
        path = self.blob_path(sha256)
        size = path.stat().st_size
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha1.update(chunk)
        return {"sha256": sha256, "sha1": sha1.hexdigest(), "size": size}

    # ---------- repos ----------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = split_repo_id(repo_id, self.default_namespace)
        path = self.repos / f"{repo_type}s" / namespace / name
        assert path.resolve().is_relative_to(self.repos)
        return path

    def canonical_id(self, repo_id: str) -> str:
        return "/".join(split_repo_id(repo_id, self.default_namespace))

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return json.loads(path.read_text())

    def create_repo(self, repo_type: str, repo_id: str, private: bool, sdk: str | None, author: str) -> dict:
        folder = self.repo_dir(repo_type, repo_id)
        with self._lock:
            if (folder / "repo.json").is_file():
                raise HubError(409, f"You already created this {repo_type} repo: {self.canonical_id(repo_id)}")
            meta = {
                "id": self.canonical_id(repo_id),
                "type": repo_type,
                "private": bool(private),
                "sdk": sdk,
                "createdAt": now_iso(),
            }
            files = {".gitattributes": {**self.put_bytes(DEFAULT_GITATTRIBUTES.encode()), "lfs": False}}
            commit = self._write_commit(folder, [], files, "initial commit", "", author)
            self._write_json(folder / "refs.json", {"branches": {"main": commit["id"]}, "tags": {}})
            self._write_json(folder / "repo.json", meta)  # written last: the repo exists once it is complete
            return meta

    def update_settings(self, repo_type: str, repo_id: str, private: bool | None) -> None:
        with self._lock:
            meta = self.repo_meta(repo_type, repo_id)
            if private is not None:
                meta["private"] = bool(private)
            self._write_json(self.repo_dir(repo_type, repo_id) / "repo.json", meta)

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            self.repo_meta(repo_type, repo_id)
            folder = self.repo_dir(repo_type, repo_id)
            trash = self.tmp / f"deleted-{uuid.uuid4().hex}"
            os.replace(folder, trash)  # atomic disappearance; blobs stay (they may be shared)
        shutil.rmtree(trash, ignore_errors=True)

    def list_repos(self, repo_type: str) -> list[dict]:
        """Every complete repo of a type (its repo.json, written last), as stored."""
        return [json.loads(p.read_text()) for p in sorted((self.repos / f"{repo_type}s").glob("*/*/repo.json"))]

    # ---------- refs and commits ----------
    def refs(self, repo_type: str, repo_id: str) -> dict:
        self.repo_meta(repo_type, repo_id)
        return json.loads((self.repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Branch, tag, refs/heads/x, refs/tags/x or a full commit id -> commit id; 404 RevisionNotFound otherwise."""
        refs = self.refs(repo_type, repo_id)
        name = revision
        for prefix, kind in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs[kind]:
                return refs[kind][revision[len(prefix) :]]
        if name in refs["branches"]:
            return refs["branches"][name]
        if name in refs["tags"]:
            return refs["tags"][name]
        if _COMMIT_RE.match(name) and (self.repo_dir(repo_type, repo_id) / "commits" / f"{name}.json").is_file():
            return name
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, repo_type: str, repo_id: str, commit_id: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json").read_text())

    def _write_commit(self, folder: Path, parents: list, files: dict, title: str, message: str, author: str) -> dict:
        body = {"parents": parents, "title": title, "message": message, "date": now_iso(), "author": author}
        body["files"] = dict(sorted(files.items()))
        body["id"] = hashlib.sha1(json.dumps({**body, "nonce": uuid.uuid4().hex}).encode()).hexdigest()
        self._write_json(folder / "commits" / f"{body['id']}.json", body)
        return body

    def apply_commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        operations: list[tuple[str, str, dict | None]],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None,
    ) -> str:
        """Apply ("put", path, entry) / ("delete", path, None) / ("delete_folder", path, None) on top of `branch`.

        Blobs must already be stored. Under the lock: check `parent_commit`, write the commit file, swap refs."""
        folder = self.repo_dir(repo_type, repo_id)
        with self._lock:
            refs = self.refs(repo_type, repo_id)
            if branch.startswith("refs/heads/"):
                branch = branch[len("refs/heads/") :]
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
            head = refs["branches"][branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412, f"A commit has happened since. Please refresh and try again. ({branch} is at {head})"
                )
            files = dict(self.commit(repo_type, repo_id, head)["files"])
            for kind, path, entry in operations:
                if kind == "put":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            commit = self._write_commit(folder, [head], files, title, message, author)
            refs["branches"][branch] = commit["id"]
            self._write_json(folder / "refs.json", refs)
            return commit["id"]

    def set_ref(self, repo_type: str, repo_id: str, kind: str, name: str, revision: str | None) -> None:
        """Create (`revision` given) or delete (`revision` None) a branch or tag."""
        folder = self.repo_dir(repo_type, repo_id)
        label = "Branch" if kind == "branches" else "Tag"
        with self._lock:
            refs = self.refs(repo_type, repo_id)
            if revision is None:
                if name not in refs[kind]:
                    raise HubError(404, f"{label} {name} not found", "RevisionNotFound")
                if kind == "branches" and name == "main":
                    raise HubError(403, "The main branch cannot be deleted")
                del refs[kind][name]
            else:
                if not _REF_RE.match(name) or ".." in name or len(name) > 200:
                    raise HubError(
                        400, f"Invalid {label.lower()} name {name!r}: use letters, digits, '.', '-', '_', '/'"
                    )
                if name in refs["branches"] or name in refs["tags"]:
                    raise HubError(409, f"Reference already exists: {name}")
                refs[kind][name] = self.resolve(repo_type, repo_id, revision)
            self._write_json(folder / "refs.json", refs)

    def history(self, repo_type: str, repo_id: str, commit_id: str, limit: int = 10_000) -> list[dict]:
        out = []
        while commit_id and len(out) < limit:
            commit = self.commit(repo_type, repo_id, commit_id)
            out.append(commit)
            commit_id = commit["parents"][0] if commit["parents"] else None
        return out

    def last_commit_touching(self, repo_type: str, repo_id: str, commit_id: str, path: str) -> dict:
        """The newest commit in which `path` (file or folder prefix) changed; walks back from `commit_id`."""

        def view(commit: dict) -> dict:
            return {p: e for p, e in commit["files"].items() if p == path or p.startswith(path + "/")}

        commits = self.history(repo_type, repo_id, commit_id, limit=1000)
        for newer, older in zip(commits, commits[1:]):
            if view(newer) != view(older):
                return newer
        return commits[-1]

    # ---------- commit payloads and listings (the server's heavier handlers) ----------
    def apply_ndjson(self, lines, repo_type: str, repo: str, rev: str, author: str) -> str:
        """Parse a commit's ndjson (header, file, lfsFile, deletedFile, deletedFolder) and apply it atomically."""
        header, operations = None, []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Commit line {number} is not a {{'key', 'value'}} JSON object") from None
            if key == "header":
                header = value
                continue
            path = validate_repo_path(value.get("path"))
            if key == "file":
                try:
                    data = (
                        base64.b64decode(value["content"], validate=True)
                        if value.get("encoding", "base64") == "base64"
                        else value["content"].encode()
                    )
                except (binascii.Error, KeyError, AttributeError):
                    raise HubError(400, f"Commit line {number}: content of {path!r} is not valid base64") from None
                operations.append(("put", path, {**self.put_bytes(data), "lfs": False}))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if not self.has_blob(oid, size):
                    raise HubError(
                        400, f"LFS object {oid} for {path!r} was never uploaded (or has another size): upload it first"
                    )
                operations.append(("put", path, {**self.blob_entry(oid), "lfs": True}))
            elif key == "deletedFile":
                operations.append(("delete", path, None))
            elif key == "deletedFolder":
                operations.append(("delete_folder", path, None))
            else:
                raise HubError(400, f"Commit line {number}: unsupported operation {key!r}")
        if not isinstance(header, dict) or not header.get("summary"):
            raise HubError(400, "Commit has no header line with a 'summary' (the commit message)")
        parent = header.get("parentCommit")
        return self.apply_commit(
            repo_type, repo, rev, operations, header["summary"], header.get("description") or "", author, parent
        )

    def entries(self, repo_type, repo, commit_id, files, paths, expand) -> list[dict]:
        """Tree entries for `paths` (files or folders that exist in `files`)."""
        out = []
        for path in paths:
            if path in files:
                entry = files[path]
                item = {"type": "file", "oid": entry_oid(entry), "size": entry["size"], "path": path}
                if entry["lfs"]:
                    item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 0}
                    item["lfs"]["pointerSize"] = len(lfs_pointer(entry))
            else:
                under = sorted((p, entry_oid(e)) for p, e in files.items() if p.startswith(path + "/"))
                item = {"type": "directory", "oid": hashlib.sha1(json.dumps(under).encode()).hexdigest(), "size": 0}
                item["path"] = path
            if expand:
                last = self.last_commit_touching(repo_type, repo, commit_id, path)
                item["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
            out.append(item)
        return out

    def card_data(self, files: dict) -> dict | None:
        """YAML front matter of README.md, as the Hub reports it in `cardData`."""
        entry = files.get("README.md")
        if entry is None or entry["size"] > 1 << 20:
            return None
        text = self.blob_path(entry["sha256"]).read_text(errors="replace")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        if not match:
            return None
        import yaml

        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None
