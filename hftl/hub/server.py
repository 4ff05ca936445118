"""A local, loopback Hugging Face Hub endpoint (run by `hftl.hub.serving`: `hftl hub serve`, the test fixture).

The real `huggingface_hub` client, transformers (`from_pretrained`, `push_to_hub`, `pipeline`) and datasets
(`push_to_hub`, `load_dataset("user/name")`) work against it once `HF_ENDPOINT=http://127.0.0.1:8765` is set *before*
`huggingface_hub` is imported. Storage is a content-addressed blob store on disk (see `hftl.hub.store`): model,
dataset and space repos, branches and tags, atomic commits (a failed commit leaves the repo as it was),
`parentCommit` conflicts answered with 412.

Upload modes: by default every file is answered `uploadMode: "regular"`, so contents travel base64 inside the commit
and the client works with default settings (hf_xet installed or not). With `lfs_threshold=N` (CLI `--lfs-threshold`)
files larger than N bytes are answered `"lfs"`; the client must then run with `HF_HUB_DISABLE_XET=1` (read when
huggingface_hub is imported) and sends them through the classic git-LFS batch -> PUT -> verify path, which is
faster and lighter for big weights. Without that variable the client tries Xet and gets a 501 naming the fix.

Security: binds 127.0.0.1 by default. With `token=...` every request must carry `Authorization: Bearer <token>`
(401 otherwise); with `anonymous_read=True` anonymous clients may read public repos while private repos answer 404
as if absent. Without a token the server is open to whoever can reach it (all repos readable). Commit paths are
validated (no `..`, absolute paths, backslashes or `.git/`) -> 400; request bodies larger than `max_body_bytes` -> 413.
LFS upload URLs are signed per object, since the client PUTs them without credentials. Errors are JSON
`{"error": msg}` with `X-Error-Code` / `X-Error-Message` headers, as on the Hub.

Limits: no Xet storage (xet token endpoints answer 501), no pull requests (`create_pr` answers 501: commit to a
branch instead), no Space runtime (Space repos store files only), no discussions,
one server process per data dir. Listing (`GET /api/models|datasets|spaces`: HfApi.list_models and friends, the
`hf` CLI) takes `search` (in the id), `author`, `filter` (tags), `sort`/`direction` and `limit`; private repos are
listed only to the token holder (who owns every repo here), never to anonymous readers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, unquote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from hftl.hub.store import REPO_TYPES, HubError, Store, entry_oid, lfs_pointer, validate_repo_path

DEFAULT_MAX_BODY_BYTES = 5 * 1024**3
_TRUE = ("1", "true", "True")
_XET_MESSAGE = (
    "Xet storage is not supported by the hftl local hub. Set HF_HUB_DISABLE_XET=1 before huggingface_hub is imported "
    "(the client then uses classic LFS), or run the server without --lfs-threshold (all files uploaded as regular)."
)
_PR_MESSAGE = (
    "Pull requests are not supported by the hftl local hub: create a branch (HfApi.create_branch) and commit to it "
    "with revision=<branch> instead of create_pr=True."
)
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_T = r"(?P<t>models|datasets|spaces)"
_P = r"(?:(?P<p>datasets|spaces)/)?"


def _error_response(error: HubError) -> JSONResponse:
    headers = {"X-Error-Message": re.sub(r"[^\x20-\x7e]", " ", error.message)[:1000]}
    if error.code:
        headers["X-Error-Code"] = error.code
    return JSONResponse({"error": error.message, **error.extra}, status_code=error.status, headers=headers)


async def _read_body(request: Request, limit: int, spool=None) -> bytes | None:
    """Read the body (into `spool` if given) with a size cap: 413 before or while reading."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HubError(413, f"Request body of {declared} bytes exceeds the server limit of {limit} bytes")
    received, chunks = 0, []
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HubError(413, f"Request body exceeds the server limit of {limit} bytes")
        spool.write(chunk) if spool is not None else chunks.append(chunk)
    return None if spool is not None else b"".join(chunks)


async def _json_body(request: Request, limit: int) -> dict:
    body = await _read_body(request, limit)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError as e:
        raise HubError(400, f"Request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HubError(400, "Request body must be a JSON object")
    return data


class LocalHub:
    """Request handlers; routing is done on the raw path so revisions like `refs%2Fpr%2F1` keep their `%2F`."""

    def __init__(self, store: Store, token, user, lfs_threshold, max_body_bytes, anonymous_read):
        self.store, self.token, self.user = store, token, user
        self.lfs_threshold, self.max_body_bytes, self.anonymous_read = lfs_threshold, max_body_bytes, anonymous_read
        self._secret = secrets.token_bytes(32)  # signs LFS upload URLs; new per process
        r = self._route
        self.routes = [
            r("GET", r"/api/whoami-v2", self.whoami, "user"),
            r("GET", rf"/api/{_T}", self.list_repos, "list"),
            r("POST", r"/api/repos/create", self.create_repo, "user"),
            r("DELETE", r"/api/repos/delete", self.delete_repo, "user"),
            r("POST", r"/api/validate-yaml", self.validate_yaml, "user"),
            r("GET", rf"/api/{_T}/{_REPO}/revision/(?P<rev>[^/]+)", self.info, "read"),
            r("GET", rf"/api/{_T}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree, "read"),
            r("POST", rf"/api/{_T}/{_REPO}/paths-info/(?P<rev>[^/]+)", self.paths_info, "read"),
            r("GET", rf"/api/{_T}/{_REPO}/refs", self.refs, "read"),
            r("GET", rf"/api/{_T}/{_REPO}/commits/(?P<rev>[^/]+)", self.commits, "read"),
            r("POST", rf"/api/{_T}/{_REPO}/preupload/(?P<rev>[^/]+)", self.preupload, "write"),
            r("POST", rf"/api/{_T}/{_REPO}/commit/(?P<rev>[^/]+)", self.commit, "write"),
            r("POST|DELETE", rf"/api/{_T}/{_REPO}/branch/(?P<name>[^/]+)", self.branch, "write"),
            r("POST|DELETE", rf"/api/{_T}/{_REPO}/tag/(?P<name>[^/]+)", self.tag, "write"),
            r("PUT", rf"/api/{_T}/{_REPO}/settings", self.settings, "write"),
            r("GET|POST", rf"/api/{_T}/{_REPO}/xet-(?:read|write)-token/.*", self.xet, "user"),
            r("GET", rf"/api/{_T}/{_REPO}", self.info, "read"),  # after the routes it would shadow
            r("POST", rf"/{_P}{_REPO}\.git/info/lfs/objects/batch", self.lfs_batch, "write"),
            r("PUT", r"/hftl-lfs/upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload, "signed"),
            r("POST", r"/hftl-lfs/verify", self.lfs_verify, "user"),
            r("GET|HEAD", rf"/{_P}{_REPO}/(?:resolve|raw)/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve, "read"),
        ]

    @staticmethod
    def _route(methods, pattern, handler, access):
        return set(methods.split("|")), re.compile(f"^{pattern}$"), handler, access

    # ---------- dispatch and access control ----------
    async def dispatch(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1").split("?")[0]
        try:
            for methods, pattern, handler, access in self.routes:
                match = pattern.match(raw_path)
                if match and request.method in methods:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    if "t" in args:
                        args["repo_type"] = args.pop("t")[:-1]
                    elif access != "signed" and "repo" in args:
                        args["repo_type"] = (args.pop("p", None) or "models")[:-1]
                    self._check_access(request, access, args)
                    return await handler(request, **args)
            raise HubError(404, f"No such endpoint on the hftl local hub: {request.method} {raw_path}")
        except HubError as error:
            return _error_response(error)
        except ClientDisconnect:  # the client went away mid-body: nothing was applied, nobody reads an answer
            return Response(status_code=400)

    def _check_access(self, request: Request, access: str, args: dict) -> None:
        if self.token is None or access == "signed":
            return
        header = request.headers.get("authorization", "")
        if access == "list" and not header and self.anonymous_read:
            return  # public repos only (list_repos checks the header itself)
        if header:
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise HubError(401, "Invalid credentials in Authorization header")
            return
        if access == "read" and self.anonymous_read:
            if self.store.repo_meta(args["repo_type"], args["repo"])["private"]:
                raise HubError(404, f"Repository not found: {args['repo']}", "RepoNotFound")
            return
        raise HubError(401, "This hftl local hub requires a token: send 'Authorization: Bearer <token>' (HF_TOKEN)")

    def _url(self, request: Request, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{str(request.base_url).rstrip('/')}/{prefix}{repo_id}"

    def _files_at(self, repo_type, repo, rev) -> tuple[str, dict]:
        commit_id = self.store.resolve(repo_type, repo, rev)
        return commit_id, self.store.commit(repo_type, repo, commit_id)["files"]

    # ---------- account and repo management ----------
    async def whoami(self, request):
        access = {"displayName": "hftl-local", "role": "write"}
        return JSONResponse(
            {"type": "user", "id": self.user, "name": self.user, "fullname": self.user, "email": None, "orgs": [],
             "emailVerified": False, "isPro": False, "auth": {"type": "access_token", "accessToken": access}}
        )  # fmt: skip

    async def create_repo(self, request):
        body = await _json_body(request, self.max_body_bytes)
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {REPO_TYPES}")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo 'name'")
        repo_id = f"{body.get('organization') or self.user}/{name}"
        private = body.get("private") or body.get("visibility") == "private"
        url = self._url(request, repo_type, self.store.canonical_id(repo_id))
        try:
            meta = self.store.create_repo(repo_type, repo_id, private, body.get("sdk"), self.user)
        except HubError as error:
            error.extra["url"] = url  # create_repo(exist_ok=True) and transformers read it from the 409
            raise
        return JSONResponse({"url": url, "name": meta["id"], "id": meta["id"]})

    async def delete_repo(self, request):
        body = await _json_body(request, self.max_body_bytes)
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        self.store.delete_repo(body.get("type") or "model", repo_id)
        return JSONResponse({})

    async def validate_yaml(self, request):
        await _read_body(request, self.max_body_bytes)
        return JSONResponse({"errors": [], "warnings": []})

    async def settings(self, request, repo_type, repo):
        body = await _json_body(request, self.max_body_bytes)
        private = body.get("private")
        if "visibility" in body:
            private = body["visibility"] == "private"
        self.store.update_settings(repo_type, repo, private)
        return JSONResponse({})

    async def xet(self, request, repo_type, repo):
        raise HubError(501, _XET_MESSAGE)

    # ---------- reading ----------
    async def list_repos(self, request, repo_type):
        query = request.query_params
        # with a token set, only its holder gets here with a header (checked above): they own every repo
        show_private = self.token is None or bool(request.headers.get("authorization"))
        search, author = (query.get("search") or "").lower(), query.get("author")
        wanted_tags = set(query.getlist("filter"))
        found = []
        for meta in self.store.list_repos(repo_type):
            if (meta["private"] and not show_private) or search not in meta["id"].lower():
                continue
            if author and meta["id"].split("/")[0] != author:
                continue
            summary = self._summary(repo_type, meta)
            if wanted_tags <= set(summary["tags"]):
                found.append(summary)
        sort, descending = query.get("sort"), query.get("direction") == "-1"
        if sort not in (None, "id", "createdAt", "lastModified"):
            # downloads, likes, trending: all zero here; newest first is the useful order
            sort, descending = "lastModified", True
        found.sort(key=lambda item: item[sort or "id"], reverse=descending)
        limit = query.get("limit")
        if limit is not None:
            if not limit.isdigit():
                raise HubError(400, f"limit must be a non-negative integer, got {limit!r}")
            found = found[: int(limit)]
        return JSONResponse(found)

    def _summary(self, repo_type: str, meta: dict) -> dict:
        """What the Hub's listing gives per repo: ids, dates, visibility, tags and the card's task."""
        commit_id = self.store.resolve(repo_type, meta["id"], "main")
        commit = self.store.commit(repo_type, meta["id"], commit_id)
        card = self.store.card_data(commit["files"]) or {}
        item = {
            "_id": hashlib.sha1(meta["id"].encode()).hexdigest()[:24],
            "id": meta["id"],
            "author": meta["id"].split("/")[0],
            "sha": commit_id,
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card["tags"]) if isinstance(card.get("tags"), list) else [],
            "createdAt": meta["createdAt"],
            "lastModified": commit["date"],
        }
        item.update({key: card[key] for key in ("library_name", "pipeline_tag") if isinstance(card.get(key), str)})
        if repo_type == "space":
            item["sdk"] = meta.get("sdk")
        return item

    async def info(self, request, repo_type, repo, rev="main"):
        meta = self.store.repo_meta(repo_type, repo)
        commit_id = self.store.resolve(repo_type, repo, rev)
        commit = self.store.commit(repo_type, repo, commit_id)
        with_blobs = request.query_params.get("blobs") in _TRUE
        siblings = []
        for path, entry in commit["files"].items():
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry_oid(entry))
                if entry["lfs"]:
                    sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": 0}
                    sibling["lfs"]["pointerSize"] = len(lfs_pointer(entry))
            siblings.append(sibling)
        card = self.store.card_data(commit["files"])
        data = {
            "_id": hashlib.sha1(meta["id"].encode()).hexdigest()[:24],
            "id": meta["id"],
            "author": meta["id"].split("/")[0],
            "sha": commit_id,
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []) if isinstance((card or {}).get("tags"), list) else [],
            "createdAt": meta["createdAt"],
            "lastModified": commit["date"],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["files"].values()),
        }
        if card is not None:
            data["cardData"] = card
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    data[key] = card[key]
        if repo_type == "space":
            data["sdk"] = meta.get("sdk")
        return JSONResponse(data)

    async def tree(self, request, repo_type, repo, rev, path=""):
        commit_id, files = self._files_at(repo_type, repo, rev)
        path = path.strip("/")
        recursive = request.query_params.get("recursive") in _TRUE
        prefix = f"{path}/" if path else ""
        children = set()
        for file_path in files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            children.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        if path and not children:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound")
        expand = request.query_params.get("expand") in _TRUE
        return JSONResponse(self.store.entries(repo_type, repo, commit_id, files, sorted(children), expand))

    async def paths_info(self, request, repo_type, repo, rev):
        body = await _read_body(request, self.max_body_bytes)
        if request.headers.get("content-type", "").startswith("application/json"):
            form = json.loads(body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0] in _TRUE
        commit_id, files = self._files_at(repo_type, repo, rev)
        wanted = [p.strip("/") for p in paths]
        existing = [p for p in wanted if p in files or any(f.startswith(p + "/") for f in files)]
        return JSONResponse(self.store.entries(repo_type, repo, commit_id, files, existing, expand))

    async def refs(self, request, repo_type, repo):
        refs = self.store.refs(repo_type, repo)

        def listing(kind, prefix):
            return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c} for n, c in refs[kind].items()]

        return JSONResponse(
            {"branches": listing("branches", "heads"), "converts": [], "tags": listing("tags", "tags"),
             "pullRequests": []}
        )  # fmt: skip

    async def commits(self, request, repo_type, repo, rev):
        commit_id = self.store.resolve(repo_type, repo, rev)
        history = self.store.history(repo_type, repo, commit_id)
        return JSONResponse(
            [{"id": c["id"], "authors": [{"user": c["author"]}], "date": c["date"], "title": c["title"],
              "message": c["message"]} for c in history]
        )  # fmt: skip

    async def resolve(self, request, repo_type, repo, rev, path):
        self.store.repo_meta(repo_type, repo)
        commit_id, files = self._files_at(repo_type, repo, rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{entry_oid(entry)}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        return FileResponse(self.store.blob_path(entry["sha256"]), headers=headers)

    # ---------- writing ----------
    async def preupload(self, request, repo_type, repo, rev):
        if request.query_params.get("create_pr") in _TRUE:
            raise HubError(501, _PR_MESSAGE)
        body = await _json_body(request, self.max_body_bytes)
        self.store.repo_meta(repo_type, repo)
        try:
            files = self._files_at(repo_type, repo, rev)[1]
        except HubError:
            files = {}  # a branch that does not exist yet: nothing to compare with
        answer = []
        for item in body.get("files", []):
            path = validate_repo_path(item.get("path"))
            size = item.get("size") or 0
            mode = "lfs" if self.lfs_threshold is not None and size > self.lfs_threshold else "regular"
            remote = files.get(path)
            oid = None if remote is None else remote["sha256"] if mode == "lfs" else remote["sha1"]
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": answer, "commitOid": self.store.resolve(repo_type, repo, "main")})

    async def commit(self, request, repo_type, repo, rev):
        if request.query_params.get("create_pr") in _TRUE:
            raise HubError(501, _PR_MESSAGE)
        self.store.repo_meta(repo_type, repo)
        with tempfile.SpooledTemporaryFile(max_size=16 << 20, dir=self.store.tmp) as spool:
            await _read_body(request, self.max_body_bytes, spool)  # a dropped connection ends here: nothing applied
            spool.seek(0)
            commit_id = await run_in_threadpool(self.store.apply_ndjson, spool, repo_type, repo, rev, self.user)
        url = f"{self._url(request, repo_type, self.store.canonical_id(repo))}/commit/{commit_id}"
        return JSONResponse({"success": True, "commitOid": commit_id, "commitUrl": url, "pullRequestUrl": None})

    async def branch(self, request, repo_type, repo, name):
        if request.method == "DELETE":
            self.store.set_ref(repo_type, repo, "branches", name, None)
        else:
            body = await _json_body(request, self.max_body_bytes)
            self.store.set_ref(repo_type, repo, "branches", name, body.get("startingPoint") or "main")
        return JSONResponse({})

    async def tag(self, request, repo_type, repo, name):
        if request.method == "DELETE":
            self.store.set_ref(repo_type, repo, "tags", name, None)
            return JSONResponse({})
        body = await _json_body(request, self.max_body_bytes)
        if not isinstance(body.get("tag"), str):
            raise HubError(400, "Missing 'tag' in request body")
        self.store.set_ref(repo_type, repo, "tags", body["tag"], name)  # `name` is the revision being tagged
        return JSONResponse({})

    # ---------- classic git-LFS ----------
    def _signature(self, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    async def lfs_batch(self, request, repo_type, repo):
        body = await _json_body(request, self.max_body_bytes)
        self.store.repo_meta(repo_type, repo)
        if body.get("operation") != "upload":
            raise HubError(400, "Only LFS 'upload' batches are supported; download files through /resolve/")
        base, objects = str(request.base_url).rstrip("/"), []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(size, int) or not re.fullmatch(r"[0-9a-f]{64}", str(oid)):
                raise HubError(400, f"Invalid LFS object {obj!r}: expected a sha256 'oid' and an integer 'size'")
            if size > self.max_body_bytes:
                objects.append({"oid": oid, "size": size, "error": {"code": 413, "message": "Object too large"}})
            elif self.store.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: the client skips the upload
            else:
                href = f"{base}/hftl-lfs/upload/{oid}?size={size}&sig={self._signature(oid, size)}"
                actions = {"upload": {"href": href}, "verify": {"href": f"{base}/hftl-lfs/verify"}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")

    async def lfs_upload(self, request, oid):
        size = request.query_params.get("size", "")
        if not size.isdigit() or not hmac.compare_digest(
            request.query_params.get("sig", ""), self._signature(oid, int(size))
        ):
            raise HubError(403, "Invalid or missing upload signature: ask the LFS batch endpoint for an upload URL")
        tmp, digest, received = self.store.new_tmp_path(), hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > int(size):
                        raise HubError(400, f"LFS object {oid}: more than the announced {size} bytes")
                    digest.update(chunk)
                    f.write(chunk)
            if received != int(size) or digest.hexdigest() != oid:
                raise HubError(400, f"LFS object {oid}: received {received} bytes whose sha256 does not match")
            self.store.adopt_blob(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse({})

    async def lfs_verify(self, request):
        body = await _json_body(request, self.max_body_bytes)
        if not self.store.has_blob(body.get("oid"), body.get("size")):
            raise HubError(404, f"LFS object {body.get('oid')} not found", "EntryNotFound")
        return JSONResponse({})


def create_app(
    data_dir: str | Path,
    token: str | None = None,
    user: str = "hftl",
    lfs_threshold: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    anonymous_read: bool = False,
) -> FastAPI:
    """The Hub endpoint as a FastAPI app over the store in `data_dir` (created if missing)."""
    hub = LocalHub(Store(data_dir, default_namespace=user), token, user, lfs_threshold, max_body_bytes, anonymous_read)
    app = FastAPI(title="hftl local hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.add_api_route(
        "/{path:path}", hub.dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"], include_in_schema=False
    )
    return app
