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

Tokens map to a user and the organizations it can write to; a private repo is visible only to them (404 for everyone
else, 401 without a token, as the Hub hides it). Tests inject failures with `fail_next` (an HTTP status with the Hub's
error message and code, or `0` to drop the connection without answering) and read `requests` to see what the client
did, `errors` for the tracebacks of requests the server could not handle (answered 500).

Untrusted input never reaches the file system unchecked: repo ids must be exactly `namespace/name` with the Hub's
characters (each URL segment decoded once), LFS oids 64 lowercase hex digits, file paths relative and inside the repo,
and every storage path is resolved and checked to stay under `root`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
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
# One segment of a repo id as the Hub accepts it: ASCII letters, digits, '-', '_', '.', at most 96 characters, starting
# and ending with a letter, digit or '_'. `--` and `..` are reserved (cache folder names, path tricks), so is `.git`.
_REPO_SEGMENT_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?")
_LFS_OID_RE = re.compile(r"[0-9a-f]{64}")
_MAX_PATH_LENGTH = 1000


def is_repo_segment(segment: str) -> bool:
    """Whether `segment` is a valid namespace or repo name (already URL-decoded, exactly once)."""
    return (bool(_REPO_SEGMENT_RE.fullmatch(segment)) and "--" not in segment and ".." not in segment
            and not segment.endswith(".git"))


def is_repo_id(repo_id: str, *, namespace_required: bool = True) -> bool:
    """Whether `repo_id` is `namespace/name` (or a bare `name` when `namespace_required` is false), as the Hub
    accepts it."""
    segments = repo_id.split("/") if isinstance(repo_id, str) else []
    return len(segments) in ((2,) if namespace_required else (1, 2)) and all(map(is_repo_segment, segments))


def is_lfs_oid(oid: object) -> bool:
    """Whether `oid` is a sha256 as the LFS API names objects (64 lowercase hex digits)."""
    return isinstance(oid, str) and bool(_LFS_OID_RE.fullmatch(oid))


def is_repo_path(path: object) -> bool:
    """Whether `path` is a file path that stays inside a repo: relative, `/`-separated, no empty, `.` or `..`
    segment, no backslash (Windows separators would turn `..\\x` into a parent) and no control character."""
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH_LENGTH:
        return False
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    return all(segment not in ("", ".", "..") for segment in path.split("/"))


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

    def str_or_list(key: str, allowed: set[str] | None = None, valid: Callable[[str], bool] | None = None) -> None:
        if key not in meta:
            return
        values = meta[key] if isinstance(meta[key], list) else [meta[key]]
        for value in values:
            if not isinstance(value, str):
                errors.append(f'"{key}" must be a string or a list of strings')
            elif allowed is not None and value not in allowed:
                errors.append(f'"{key}" has an unknown value: {value!r}')
            elif valid is not None and not valid(value):
                errors.append(f'"{key}" is not a valid repo id: {value!r}')

    str_or_list("license", KNOWN_LICENSES)
    str_or_list("language")
    str_or_list("base_model", valid=partial(is_repo_id, namespace_required=False))
    str_or_list("datasets", valid=partial(is_repo_id, namespace_required=False))
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
    message: str = "injected failure"
    code: str | None = None


@dataclass
class FakeHub:
    """The server. `FakeHub(root).start()`; `url` is its endpoint; `stop()` shuts it down (the files stay)."""

    root: Path
    tokens: dict[str, tuple[str, list[str]]] = field(
        default_factory=lambda: {"hf_alice_write": ("alice", ["acme"]), "hf_bob_write": ("bob", [])}
    )
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tracebacks of requests answered 500

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._real_root = self.root.resolve()
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

    def fail_next(self, method: str, path_regex: str, status: int = 503, times: int = 1,
                  message: str = "injected failure", code: str | None = None) -> None:
        """Answers the next `times` requests whose method and path match with `status` (0: drop the connection),
        carrying `message` and the `X-Error-Code` `code` the way the Hub reports its errors."""
        with self._lock:
            self._faults.append(Fault(method.upper(), re.compile(path_regex), status, times, message, code))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and fault.pattern.search(path) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    # -- storage ---------------------------------------------------------------------------------------------------
    def _inside_storage(self, path: Path) -> Path:
        """`path` resolved, once it is known to stay under `root`. Validation already refuses every trick we know;
        this is the last line against one we don't (a symlink, a case we missed)."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self._real_root):
            raise HubError(404, "Not found")
        return resolved

    def _repo_file(self, repo_id: str) -> Path:
        if not is_repo_id(repo_id):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self._inside_storage(self.root / "repos" / f"{repo_id}.json")

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
        if not is_lfs_oid(sha256):
            raise HubError(400, "Invalid LFS oid: expected 64 lowercase hex digits")
        return self._inside_storage(self.root / "objects" / sha256)

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


def _repo_id_from_url(namespace: str, name: str) -> str:
    """`namespace/name` from two URL segments, each decoded exactly once. A segment that decodes to `..`, holds a `/`
    (a second namespace) or anything else the Hub refuses names no repo: 404, as the Hub answers unknown repos."""
    if not (is_repo_segment(namespace) and is_repo_segment(name)):
        raise HubError(404, "Repository not found", "RepoNotFound")
    return f"{namespace}/{name}"


def _is_branch_name(name: object) -> bool:
    """Whether `name` is a branch name git (and so the Hub) accepts, in the subset this server needs."""
    return is_repo_path(name) and not any(c in name for c in " ~^:?*[") and not name.endswith(".lock")


def _b64decode(value: object, what: str) -> bytes:
    """Strict base64 of a request field; 400 for anything else (a crafted field must not become a 500)."""
    try:
        return base64.b64decode(value if isinstance(value, str) else "\0", validate=True)
    except ValueError:
        raise HubError(400, f"{what} is not valid base64") from None


def _require(condition: bool, message: str, status: int = 400) -> None:
    """Refuses a malformed request with `status` (400 unless told)."""
    if not condition:
        raise HubError(status, message)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects

    def log_message(self, *args) -> None:  # keep pytest output clean; `hub.requests` has the log
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        try:
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
            length = int(self.headers.get("Content-Length") or 0)
            _require(length >= 0, "Invalid Content-Length")
            return self.rfile.read(length)
        except (ValueError, HubError):
            # The rest of the stream cannot be framed: answer, then close rather than misread the next request.
            self.close_connection = True
            raise HubError(400, "Invalid request body framing") from None

    def _json_body(self) -> dict:
        body = self._body()
        try:
            value = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None
        _require(isinstance(value, dict), "The JSON body must be an object")
        return value

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json",
              length: int | None = None) -> None:
        """Sends one answer; `length` overrides Content-Length (a HEAD announces a body it does not send)."""
        self._answering = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _send_json(self, status: int, obj: object, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, status: int, message: str, code: str | None = None) -> None:
        """An error answer the way the Hub sends it: JSON body and `X-Error-Message` (+ `X-Error-Code`)."""
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send_json(status, {"error": message}, headers)

    def _dispatch(self) -> None:
        """Answers one request. An error this server did not foresee is a bug in it: it becomes a short 500 (and a
        traceback in `hub.errors` for the test to show), never a traceback on stderr and a dropped connection."""
        self._answering = False
        try:
            self._answer()
        except Exception:
            self.hub.errors.append(traceback.format_exc())
            self.close_connection = True  # the body may be half read: never reuse this connection
            if not self._answering:  # a half-sent answer cannot be replaced, only cut off
                try:
                    self._send_error(500, "Internal Error")
                except OSError:
                    pass  # the client went away

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _answer(self) -> None:
        split = urlsplit(self.path)
        # Split before unquoting, and unquote once: a quoted revision such as refs%2Fpr%2F1 stays one segment, and
        # `%2e%2e` or `%2F` inside a repo id is then seen (and refused) for what it is; `%252e` stays `%2e`.
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        try:
            # Read the whole body first, so an early error answer never leaves bytes for the next keep-alive request.
            self._raw_body = self._read_body() if self.command in ("POST", "PUT") else b""
            fault = self.hub._take_fault(self.command, split.path)
            if fault is not None and fault.status == 0:
                self.hub.requests.append((self.command, self.path, 0))
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the connection dropped mid-request
                return
            if fault is not None:
                raise HubError(fault.status, fault.message, fault.code)
            self._route(parts, query)
        except HubError as err:
            self._send_error(err.status, err.message, err.code)

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
            content = self._json_body().get("content", "")
            _require(isinstance(content, str), '"content" must be a string')
            errors, warnings = validate_metadata(content)
            body = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
            return self._send_json(400 if errors else 200, body)
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            return self._model_api(_repo_id_from_url(parts[2], parts[3]), parts[4:], query)
        if len(parts) == 3 and parts[0] == "__lfs__" and method == "PUT":
            _require(re.fullmatch(r"[0-9]{1,15}", parts[2]) is not None, "Invalid size")
            return self._lfs_put(parts[1], int(parts[2]))
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(_repo_id_from_url(parts[0], parts[1][:-4]))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(_repo_id_from_url(parts[0], parts[1]), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"No route for {method} {urlsplit(self.path).path}")

    def _create_repo(self, body: dict) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        namespace, name = body.get("organization") or user[0], body.get("name")
        if not (isinstance(namespace, str) and isinstance(name, str) and is_repo_id(f"{namespace}/{name}")):
            raise HubError(400, f"Invalid repo name {namespace!r}/{name!r}: use letters, digits, '-', '_' or '.'")
        self.hub.can_write(user, namespace)
        if body.get("type", "model") != "model":
            raise HubError(400, "This fake Hub only hosts model repos")
        repo_id = f"{namespace}/{name}"
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

    def _writable_repo(self, repo_id: str, user) -> dict:
        """The repo, for a write: hidden (401/404) before refused (403), so a private repo's existence never leaks."""
        repo = self.hub.readable_repo(repo_id, user)
        self.hub.can_write(user, repo_id.split("/")[0])
        return repo

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
            folder = "/".join(rest[2:]).strip("/")
            if folder and not is_repo_path(folder):
                raise HubError(404, f"{folder} does not exist on this revision", "EntryNotFound")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send_json(200, _tree(files, folder, recursive))
        if method == "GET" and rest == ["refs"]:
            repo = self.hub.readable_repo(repo_id, user)
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(repo["branches"].items())
            ]
            return self._send_json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo = self.hub.readable_repo(repo_id, user)
            files = repo["commits"][self.hub.resolve_revision(repo, rest[1])]["files"]
            if "json" in self.headers.get("Content-Type", ""):
                paths = self._json_body().get("paths", [])
            else:
                paths = parse_qs(self._body().decode(errors="replace")).get("paths", [])
            _require(isinstance(paths, list) and all(isinstance(p, str) for p in paths),
                     '"paths" must be a list of strings')
            listing = {entry["path"]: entry for entry in _tree(files, "", recursive=True)}
            return self._send_json(200, [listing[p.strip("/")] for p in paths if p.strip("/") in listing])
        # Everything below writes: the namespace must be the caller's.
        if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
            body = self._json_body()
            start = body.get("startingPoint") or "main"
            with self.hub._lock:
                repo = self._writable_repo(repo_id, user)
                _require(_is_branch_name(rest[1]) and isinstance(start, str), f"Invalid reference name {rest[1]!r}")
                if rest[1] in repo["branches"]:
                    raise HubError(409, f"Branch {rest[1]} already exists")
                repo["branches"][rest[1]] = self.hub.resolve_revision(repo, start)
                self.hub._save_repo(repo_id, repo)
            return self._send_json(200, {})
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            return self._preupload(repo_id, rest[1], user)
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            return self._commit(repo_id, rest[1], user)
        raise HubError(404, f"No route for {method} {urlsplit(self.path).path}")

    def _preupload(self, repo_id: str, revision: str, user) -> None:
        body = self._json_body()
        repo = self._writable_repo(repo_id, user)
        files = repo["commits"][self.hub.resolve_revision(repo, revision)]["files"]
        items = body.get("files", [])
        _require(isinstance(items, list) and all(isinstance(i, dict) for i in items),
                 '"files" must be a list of objects')
        answer = []
        for item in items:
            path, size = item.get("path"), item.get("size")
            _require(is_repo_path(path), f"Invalid path {path!r}: it must be relative and stay inside the repo")
            _require(isinstance(size, int) and not isinstance(size, bool) and size >= 0, f"Invalid size for {path}")
            sample = _b64decode(item.get("sample", ""), f"The sample of {path}")
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = files.get(path)
            answer.append({
                "path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                # The client compares this with its own oid (sha256 for LFS, git blob id otherwise).
                "oid": (existing["sha256"] if existing["lfs"] else existing["oid"]) if existing else None,
            })
        self._send_json(200, {"files": answer, "commitOid": repo["branches"].get("main")})

    def _commit_lines(self) -> tuple[dict, list[tuple[str, dict]]]:
        """The NDJSON commit payload: its header and its (key, value) operations, each path checked to stay inside
        the repo; 400 for anything malformed."""
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HubError(400, f"Invalid NDJSON body: {err}") from None
        _require(all(isinstance(line, dict) and isinstance(line.get("value"), dict) for line in lines),
                 "Every NDJSON line must be an object with a key and an object value")
        _require(bool(lines) and lines[0].get("key") == "header", "The first NDJSON line must be the commit header")
        operations = []
        for line in lines[1:]:
            value = line["value"]
            path = value.get("path")
            # A folder deletion may name the folder with a trailing slash.
            checked = path.rstrip("/") if line.get("key") == "deletedFolder" and isinstance(path, str) else path
            _require(is_repo_path(checked), f"Invalid path {path!r}: it must be relative and stay inside the repo")
            operations.append((line.get("key"), {**value, "path": checked}))
        return lines[0]["value"], operations

    def _commit(self, repo_id: str, revision: str, user) -> None:
        self._writable_repo(repo_id, user)  # who may write is settled before the payload is even parsed
        header, operations = self._commit_lines()
        with self.hub._lock:
            repo = self._writable_repo(repo_id, user)
            if revision not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo["branches"][revision]
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][parent]["files"])
            for key, value in operations:
                files = self._apply(files, key, value)
            if any(value["path"] == "README.md" for _, value in operations) and "README.md" in files:
                card = self.hub.read_object(files["README.md"]["sha256"]).decode(errors="replace")
                errors, _ = validate_metadata(card)
                if errors:
                    raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
            summary = header.get("summary", "")
            oid = self.hub._new_commit(repo, parent, files, summary if isinstance(summary, str) else str(summary))
            repo["branches"][revision] = oid
            self.hub._save_repo(repo_id, repo)
        self._send_json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"})

    def _apply(self, files: dict, key: str, value: dict) -> dict:
        """`files` after one commit operation (paths already checked)."""
        path = value["path"]
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            return {**files, path: self.hub._file_entry(_b64decode(value.get("content"), f"The content of {path}"),
                                                        lfs=False)}
        if key == "lfsFile":
            sha = value.get("oid")
            object_path = self.hub._object_path(sha)  # 400 unless 64 lowercase hex: never a path of the client's
            if not object_path.exists():
                raise HubError(422, f"LFS object {sha} for {path} was never uploaded")
            size = object_path.stat().st_size
            entry = {"sha256": sha, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha, size))}
            return {**files, path: entry}
        if key == "deletedFile":
            if path not in files:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            return {p: e for p, e in files.items() if p != path}
        if key == "deletedFolder":
            return {p: e for p, e in files.items() if not p.startswith(path + "/")}
        raise HubError(400, f"Unknown commit operation {key!r}")

    def _lfs_batch(self, repo_id: str) -> None:
        body, user = self._json_body(), self._user()
        self._writable_repo(repo_id, user)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only basic uploads are supported")
        requested = body.get("objects", [])
        # The LFS batch API answers 422 to a request naming an object it cannot even identify.
        _require(isinstance(requested, list) and all(
            isinstance(o, dict) and is_lfs_oid(o.get("oid")) and isinstance(o.get("size"), int)
            and not isinstance(o.get("size"), bool) and o["size"] >= 0 for o in requested
        ), "Invalid object: each needs an oid of 64 lowercase hex digits and a size", status=422)
        objects = []
        for obj in requested:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.hub._object_path(obj["oid"]).exists():  # present objects get no action: nothing to upload
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/__lfs__/{obj['oid']}/{obj['size']}"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, sha256: str, size: int) -> None:
        self.hub._object_path(sha256)  # 400 for an oid that is not a sha256, before looking at the content
        data = self._body()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(400, f"Uploaded content does not match oid {sha256} and size {size}")
        self.hub.store_object(data)
        self._send(200)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self.hub.readable_repo(repo_id, self._user())
        sha = self.hub.resolve_revision(repo, revision)
        entry = repo["commits"][sha]["files"].get(path) if is_repo_path(path) else None
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        # A HEAD announces the real body's length without sending it.
        body = b"" if self.command == "HEAD" else self.hub.read_object(entry["sha256"])
        self._send(200, body, headers, content_type="application/octet-stream", length=entry["size"])


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
