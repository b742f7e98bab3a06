"""A local stand-in for the Hugging Face Hub, for tests on machines that cannot reach huggingface.co.

It speaks the subset of the Hub's HTTP API that the unmodified `huggingface_hub` client (upload without Xet, so
clients set `HF_HUB_DISABLE_XET=1`) and `transformers` (download) use:

- `GET /api/whoami-v2`, `POST /api/repos/create`, `POST /api/validate-yaml`
- `GET /api/models/{ns}/{name}[/revision/{rev}]`, `GET .../tree/{rev}[/{path}]`, `GET .../refs`,
  `POST .../branch/{branch}`, `POST .../preupload/{rev}`, `POST .../paths-info/{rev}`, `POST .../commit/{rev}` (NDJSON)
- `POST /{ns}/{name}.git/info/lfs/objects/batch` (basic transfer) and the `PUT` it names (sha256 and size checked)
- `HEAD`/`GET /{ns}/{name}/resolve/{rev}/{path}`

File contents are stored content-addressed (`objects/<sha256>`) and repositories as JSON (`repos/<ns>/<name>.json`,
branches and commits) under `root`, so a repository survives a server restart on the same folder.

Tokens map to a user and the organizations it can write to. Tests inject failures with `fail_next` (an HTTP status,
or `0` to drop the connection without answering) and read `requests` to see what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# Suffixes the Hub's default .gitattributes stores with LFS; anything binary or over 10 MB goes there too.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".model", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()

# Values the Hub accepts for these metadata keys (subsets of the Hub's lists, enough to catch typos).
KNOWN_LICENSES = {
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigcode-openrail-m",
    "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc0-1.0", "bsd-2-clause", "bsd-3-clause",
    "gpl-3.0", "lgpl-3.0", "agpl-3.0", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "other",
    "unknown", "afl-3.0", "artistic-2.0", "bsl-1.0", "ecl-2.0", "epl-2.0", "mpl-2.0", "unlicense", "wtfpl",
}
KNOWN_PIPELINE_TAGS = {
    "text-generation", "text-classification", "token-classification", "question-answering", "fill-mask",
    "summarization", "translation", "text2text-generation", "feature-extraction", "sentence-similarity",
    "image-classification", "object-detection", "image-segmentation", "image-to-text", "image-text-to-text",
    "zero-shot-classification", "zero-shot-image-classification", "automatic-speech-recognition",
    "audio-classification", "text-to-image", "depth-estimation", "image-feature-extraction",
}
KNOWN_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ID_RE = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, what the Hub reports as a regular file's `oid`/`ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def validate_metadata(content: str) -> tuple[list[str], list[str]]:
    """Checks a README's YAML front matter the way the Hub does for model repos; returns (errors, warnings)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"Invalid YAML: {err}"], []
    if meta is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"], []
    errors: list[str] = []

    def str_or_list(key: str, allowed: set[str] | None = None, pattern: re.Pattern | None = None) -> None:
        if key not in meta:
            return
        values = meta[key] if isinstance(meta[key], list) else [meta[key]]
        for value in values:
            if not isinstance(value, str):
                errors.append(f'"{key}" must be a string or a list of strings')
            elif allowed is not None and value not in allowed:
                errors.append(f'"{key}" has an unknown value: {value!r}')
            elif pattern is not None and not pattern.match(value):
                errors.append(f'"{key}" is not a valid repo id: {value!r}')

    str_or_list("license", KNOWN_LICENSES)
    str_or_list("language")
    str_or_list("base_model", pattern=REPO_ID_RE)
    str_or_list("datasets", pattern=REPO_ID_RE)
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in KNOWN_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" has an unknown value: {meta["pipeline_tag"]!r}')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    if "base_model_relation" in meta and meta["base_model_relation"] not in KNOWN_BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" has an unknown value: {meta["base_model_relation"]!r}')
    if "model-index" in meta:
        errors.extend(_validate_model_index(meta["model-index"]))
    return errors, []


def _validate_model_index(index: object) -> list[str]:
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    errors = []
    for i, entry in enumerate(index):
        where = f'"model-index[{i}]"'
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f"{where} must have a string name")
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list")
            continue
        for j, result in enumerate(results):
            rwhere = f"{where}.results[{j}]"
            task, dataset, metrics = (result.get(k) if isinstance(result, dict) else None for k in ("task", "dataset", "metrics"))
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{rwhere}.task.type is required")
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                errors.append(f"{rwhere}.dataset needs a string type and name")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{rwhere}.metrics must be a non-empty list")
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str):
                    errors.append(f"{rwhere}.metrics[{k}].type is required")
                elif not isinstance(metric.get("value"), (int, float, str)) or isinstance(metric.get("value"), bool):
                    errors.append(f"{rwhere}.metrics[{k}].value must be a number or a string")
    return errors


class HubError(Exception):
    """An HTTP error answer: status, message, and the Hub's `X-Error-Code` when it sends one."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int  # 0: close the connection without an answer
    times: int


@dataclass
class FakeHub:
    """The server. `FakeHub(root).start()`; `url` is its endpoint; `stop()` shuts it down (the files stay)."""

    root: Path
    tokens: dict[str, tuple[str, list[str]]] = field(
        default_factory=lambda: {"hf_alice_write": ("alice", ["acme"]), "hf_bob_write": ("bob", [])}
    )
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, port: int = 0) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail_next(self, method: str, path_regex: str, status: int = 503, times: int = 1) -> None:
        """Answers the next `times` requests whose method and path match with `status` (0: drop the connection)."""
        with self._lock:
            self._faults.append(Fault(method.upper(), re.compile(path_regex), status, times))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.pattern.search(path) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # -- storage ---------------------------------------------------------------------------------------------------
    def _repo_file(self, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_id}.json"

    def load_repo(self, repo_id: str) -> dict | None:
        path = self._repo_file(repo_id)
        return json.loads(path.read_text()) if path.exists() else None

    def _save_repo(self, repo_id: str, repo: dict) -> None:
        path = self._repo_file(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(repo))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written repo

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def store_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha)
        if not path.exists():
            tmp = path.with_name(f"{sha}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha

    def read_object(self, sha256: str) -> bytes:
        return self._object_path(sha256).read_bytes()

    def _new_commit(self, repo: dict, parent: str | None, files: dict, message: str) -> str:
        payload = json.dumps({"parent": parent, "files": files, "message": message, "t": time.time_ns()}, sort_keys=True)
        oid = hashlib.sha1(payload.encode()).hexdigest()
        repo["commits"][oid] = {"parent": parent, "files": files, "message": message, "date": time.time()}
        return oid

    def _file_entry(self, data: bytes, lfs: bool) -> dict:
        sha = self.store_object(data)
        git_oid = git_blob_oid(lfs_pointer(sha, len(data))) if lfs else git_blob_oid(data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "oid": git_oid}

    def resolve_revision(self, repo: dict, revision: str) -> str:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    # -- auth ------------------------------------------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> tuple[str, list[str]] | None:
        """The (user, orgs) of a bearer token; None without one; HubError 401 for an unknown one."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def can_write(self, user: tuple[str, list[str]] | None, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        name, orgs = user
        if namespace != name and namespace not in orgs:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}")

    def readable_repo(self, repo_id: str, user: tuple[str, list[str]] | None) -> dict:
        repo = self.load_repo(repo_id)
        allowed = repo is not None and (
            not repo["private"] or (user is not None and repo_id.split("/")[0] in (user[0], *user[1]))
        )
        if not allowed:
            # The Hub answers 401 to anonymous clients and 404 otherwise, both with RepoNotFound.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects

    def log_message(self, *args) -> None:  # keep pytest output clean; `hub.requests` has the log
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict:
        body = self._body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _send_json(self, status: int, obj: object, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        # Split before unquoting: a quoted revision such as refs%2Fpr%2F1 stays one segment.
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        # Read the whole body first, so an early error answer never leaves bytes for the next keep-alive request.
        self._raw_body = self._read_body() if self.command in ("POST", "PUT") else b""
        fault = self.hub._take_fault(self.command, split.path)
        if fault is not None:
            if fault.status == 0:
                self.hub.requests.append((self.command, self.path, 0))
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the connection dropped mid-request
                return
            self._send_json(fault.status, {"error": "injected failure"})
            return
        try:
            self._route(parts, query)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json(err.status, {"error": err.message}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _user(self):
        return self.hub.user_for(self.headers.get("Authorization"))

    # -- routes ----------------------------------------------------------------------------------------------------
    def _route(self, parts: list[str], query: dict) -> None:
        method = self.command
        if parts[:2] == ["api", "whoami-v2"] and method == "GET":
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._send_json(200, {
                "type": "user", "name": user[0], "fullname": user[0],
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in user[1]],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            })
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(self._json_body())
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            errors, warnings = validate_metadata(self._json_body().get("content", ""))
            body = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self._send_json(400 if errors else 200, body)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            return self._model_api(f"{parts[2]}/{parts[3]}", parts[4:], query)
        if len(parts) == 3 and parts[0] == "__lfs__" and method == "PUT":
            return self._lfs_put(parts[1], int(parts[2]))
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"No route for {method} {self.path}")

    def _create_repo(self, body: dict) -> None:
        user = self._user()
        namespace = body.get("organization") or (user[0] if user else None)
        self.hub.can_write(user, namespace)
        if body.get("type", "model") != "model":
            raise HubError(400, "This fake Hub only hosts model repos")
        name = body.get("name") or ""
        repo_id = f"{namespace}/{name}"
        if not REPO_ID_RE.match(repo_id):
            raise HubError(400, f"Invalid repo name {name!r}")
        with self.hub._lock:
            if self.hub.load_repo(repo_id) is not None:
                return self._send_json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = {"id": repo_id, "private": private, "branches": {}, "commits": {}, "created": time.time()}
            # Like the Hub, a new repo has one commit holding .gitattributes.
            files = {".gitattributes": self.hub._file_entry(GITATTRIBUTES, lfs=False)}
            repo["branches"]["main"] = self.hub._new_commit(repo, None, files, "initial commit")
            self.hub._save_repo(repo_id, repo)
        self._send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_api(self, repo_id: str, rest: list[str], query: dict) -> None:
        method, user = self.command, self._user()
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self.hub.readable_repo(repo_id, user)
            sha = self.hub.resolve_revision(repo, rest[1] if len(rest) > 1 else "main")
            files = repo["commits"][sha]["files"]
            return self._send_json(200, {
                "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                "private": repo["private"], "disabled": False, "gated": False, "tags": [], "library_name": None,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["commits"][sha]["date"])),
                "siblings": [{"rfilename": path} for path in sorted(files)],
            })
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            repo = self.hub.readable_repo(repo_id, user)
            files = repo["commits"][self.hub.resolve_revision(repo, rest[1])]["files"]
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send_json(200, _tree(files, "/".join(rest[2:]).strip("/"), recursive))
        if method == "GET" and rest == ["refs"]:
            repo = self.hub.readable_repo(repo_id, user)
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(repo["branches"].items())
            ]
            return self._send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo = self.hub.readable_repo(repo_id, user)
            files = repo["commits"][self.hub.resolve_revision(repo, rest[1])]["files"]
            body = self._body()
            ctype = self.headers.get("Content-Type", "")
            paths = json.loads(body)["paths"] if "json" in ctype else parse_qs(body.decode()).get("paths", [])
            listing = {entry["path"]: entry for entry in _tree(files, "", recursive=True)}
            return self._send_json(200, [listing[p.strip("/")] for p in paths if p.strip("/") in listing])
        # Everything below writes: the namespace must be the caller's.
        if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            body = self._json_body()
            self.hub.can_write(user, repo_id.split("/")[0])
            with self.hub._lock:
                repo = self.hub.readable_repo(repo_id, user)
                if rest[1] in repo["branches"]:
                    raise HubError(409, f"Branch {rest[1]} already exists")
                repo["branches"][rest[1]] = self.hub.resolve_revision(repo, body.get("startingPoint") or "main")
                self.hub._save_repo(repo_id, repo)
            return self._send_json(200, {})
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            body = self._json_body()
            self.hub.can_write(user, repo_id.split("/")[0])
            repo = self.hub.readable_repo(repo_id, user)
            files = repo["commits"][self.hub.resolve_revision(repo, rest[1])]["files"]
            answer = []
            for item in body.get("files", []):
                sample = base64.b64decode(item.get("sample", ""))
                lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > LFS_SIZE_THRESHOLD or b"\0" in sample
                existing = files.get(item["path"])
                answer.append({
                    "path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                    # The client compares this with its own oid (sha256 for LFS, git blob id otherwise).
                    "oid": (existing["sha256"] if existing["lfs"] else existing["oid"]) if existing else None,
                })
            return self._send_json(200, {"files": answer, "commitOid": repo["branches"].get("main")})
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            return self._commit(repo_id, rest[1], user)
        raise HubError(404, f"No route for {method} {self.path}")

    def _commit(self, repo_id: str, revision: str, user) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        self.hub.can_write(user, repo_id.split("/")[0])
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with self.hub._lock:
            repo = self.hub.readable_repo(repo_id, user)
            if revision not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo["branches"][revision]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][parent]["files"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {value['path']}")
                    files[value["path"]] = self.hub._file_entry(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    sha = value["oid"]
                    if not self.hub._object_path(sha).exists():
                        raise HubError(422, f"LFS object {sha} for {value['path']} was never uploaded")
                    size = self.hub._object_path(sha).stat().st_size
                    files[value["path"]] = {"sha256": sha, "size": size, "lfs": True,
                                            "oid": git_blob_oid(lfs_pointer(sha, size))}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            if any(line["value"].get("path") == "README.md" for line in lines[1:]) and "README.md" in files:
                errors, _ = validate_metadata(self.hub.read_object(files["README.md"]["sha256"]).decode())
                if errors:
                    raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
            oid = self.hub._new_commit(repo, parent, files, header.get("summary", ""))
            repo["branches"][revision] = oid
            self.hub._save_repo(repo_id, repo)
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"})

    def _lfs_batch(self, repo_id: str) -> None:
        body, user = self._json_body(), self._user()
        self.hub.can_write(user, repo_id.split("/")[0])
        self.hub.readable_repo(repo_id, user)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only basic uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub._object_path(obj["oid"]).exists():  # present objects get no action: nothing to upload
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/__lfs__/{obj['oid']}/{obj['size']}"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, sha256: str, size: int) -> None:
        data = self._body()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"Uploaded content does not match oid {sha256} and size {size}")
        self.hub.store_object(data)
        self._send(200)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.hub.readable_repo(repo_id, self._user())
        sha = self.hub.resolve_revision(repo, revision)
        entry = repo["commits"][sha]["files"].get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        if self.command == "HEAD":
            # Content-Length of the real body, without sending it.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(entry["size"]))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.hub.requests.append((self.command, self.path, 200))
            return
        self._send(200, self.hub.read_object(entry["sha256"]), headers, content_type="application/octet-stream")


def _tree(files: dict, folder: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of `folder` ("" is the root); raises 404 for a folder that does not exist."""
    prefix = f"{folder}/" if folder else ""
    out, seen_dirs = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix):].split("/")
        for depth in range(1, len(rel)):
            directory = prefix + "/".join(rel[:depth])
            if directory not in seen_dirs and (recursive or depth == 1):
                seen_dirs.add(directory)
                out.append({"type": "directory", "oid": hashlib.sha1(directory.encode()).hexdigest(), "path": directory})
        if recursive or len(rel) == 1:
            entry = files[path]
            item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                               "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            out.append(item)
    if folder and not out:
        raise HubError(404, f"{folder} does not exist on this revision", "EntryNotFound")
    return out


if __name__ == "__main__":  # a manual server: python tests/hub_server.py /tmp/hub 8123
    import sys

    server = FakeHub(Path(sys.argv[1] if len(sys.argv) > 1 else "fake-hub")).start(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(f"fake Hub at {server.url}; tokens: {', '.join(server.tokens)}", flush=True)
    threading.Event().wait()


def client_env(hub: FakeHub, tmp_path: Path, token: str | None = "hf_alice_write") -> dict[str, str]:
    """Environment variables that point an unmodified client process at `hub` (caches under `tmp_path`)."""
    env = {
        "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def use_in_process(hub: FakeHub, tmp_path: Path, monkeypatch, token: str | None = "hf_alice_write") -> None:
    """Points this process's `huggingface_hub` at `hub`: the env vars, and the constants it froze at import."""
    from huggingface_hub import constants

    for key, value in client_env(hub, tmp_path, token).items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
