"""Publishing to the Hub, against the local fake Hub in tests/hub_server.py (unmodified huggingface_hub client)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_compress.errors import HFCompressError
from hf_compress.hub import push_to_hub

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, HubError, client_env, is_repo_id, use_in_process  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture
def hub(tmp_path):
    server = FakeHub(tmp_path / "hub_storage").start()
    yield server
    server.stop()


@pytest.fixture
def client(hub, tmp_path, monkeypatch):
    use_in_process(hub, tmp_path, monkeypatch)
    return hub


def _build_tiny_shared_basis(path: Path) -> Path:
    from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaConfig, SharedBasisLlamaForCausalLM

    torch.manual_seed(0)
    config = SharedBasisLlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
        basis_groups={"q_proj": [[0, 1]], "up_proj": [[0], [1]]}, basis_ranks={"q_proj": [4], "up_proj": [3, 5]},
        compression={"method": "basis_sharing", "target_ratio": 0.2, "achieved_ratio": 0.21,
                     "source": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
    )
    SharedBasisLlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def checkpoint(request, tmp_path) -> Path:
    """A saved tiny SharedBasisLlama folder (the lead's conftest fixture when it exists), copied so pushes may
    write its card."""
    try:
        source = Path(request.getfixturevalue("tiny_shared_basis_checkpoint"))
    except pytest.FixtureLookupError:
        source = _build_tiny_shared_basis(tmp_path / "built")
    target = tmp_path / "checkpoint"
    shutil.copytree(source, target)
    return target


def _api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token="hf_alice_write")


def _remote_bytes(hub, repo_id: str, filename: str, tmp_path: Path, revision: str = "main") -> bytes:
    path = _api(hub).hf_hub_download(repo_id, filename, revision=revision, cache_dir=tmp_path / "dl")
    return Path(path).read_bytes()


def test_push_then_load_without_plugin_gives_identical_logits(client, checkpoint, tmp_path):
    url = push_to_hub(checkpoint, "alice/tiny-sb")
    repo = client.load_repo("alice/tiny-sb")
    head = repo["branches"]["main"]
    assert url.endswith(f"/alice/tiny-sb/commit/{head}")
    # One commit on top of the repo's initial one, holding every file of the folder and the generated card.
    files = repo["commits"][head]["files"]
    local = sorted(p.name for p in checkpoint.iterdir())
    assert sorted(set(files) - {".gitattributes"}) == local
    assert "README.md" in local
    assert files["model.safetensors"]["lfs"] and not files["config.json"]["lfs"]
    assert files["model.safetensors"]["sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    commits_after_create = [c for c in repo["commits"].values() if c["parent"] is not None]
    assert len(commits_after_create) == 1

    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 7]])
    from hf_compress.modeling.shared_basis_llama import SharedBasisLlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess below runs single-threaded: same reduction order, bitwise-equal logits
    try:
        expected = SharedBasisLlamaForCausalLM.from_pretrained(checkpoint).eval()(ids).logits
    finally:
        torch.set_num_threads(threads)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_compress"] = None  # the plugin cannot be imported: only the shipped remote code can load it
        import torch
        torch.set_num_threads(1)  # same reduction order as the reference computed in the test process
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("alice/tiny-sb", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(torch.tensor({ids.tolist()})).logits, sys.argv[1])
    """)
    out = tmp_path / "logits.pt"
    env = {**os.environ, **client_env(client, tmp_path / "fresh"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out), expected.detach())
    # The download went through the resolve endpoint of this server.
    assert any(m == "GET" and re.search(r"^/alice/tiny-sb/resolve/\w+/modeling_shared_basis_llama\.py$", p) and s == 200
               for m, p, s in client.requests), client.requests


def test_card_on_the_hub_is_the_local_one_and_passes_validation(client, checkpoint, tmp_path):
    push_to_hub(checkpoint, "acme/tiny-sb")  # an organization alice writes to
    local_card = (checkpoint / "README.md").read_text()
    assert 'from_pretrained("acme/tiny-sb", trust_remote_code=True)' in local_card
    # Someone edits the card on the Hub; pushing again must restore the local one, never fetch the remote.
    _api(client).upload_file(path_or_fileobj=b"---\nlicense: mit\n---\nedited on the Hub\n", path_in_repo="README.md",
                             repo_id="acme/tiny-sb")
    assert _remote_bytes(client, "acme/tiny-sb", "README.md", tmp_path / "a") != local_card.encode()
    push_to_hub(checkpoint, "acme/tiny-sb")
    assert (checkpoint / "README.md").read_text() == local_card
    assert _remote_bytes(client, "acme/tiny-sb", "README.md", tmp_path / "b") == local_card.encode()


def test_hand_edited_card_is_uploaded_unchanged(client, checkpoint):
    card = "---\nlicense: apache-2.0\ntags:\n- mine\n---\n# my own card\n"
    (checkpoint / "README.md").write_text(card)
    push_to_hub(checkpoint, "alice/own-card")
    repo = client.load_repo("alice/own-card")
    entry = repo["commits"][repo["branches"]["main"]]["files"]["README.md"]
    assert client.read_object(entry["sha256"]).decode() == card
    assert (checkpoint / "README.md").read_text() == card


def test_push_to_branch_and_private_repo(client, checkpoint, tmp_path):
    push_to_hub(checkpoint, "alice/branchy", revision="v1", private=True)
    repo = client.load_repo("alice/branchy")
    assert repo["private"] is True
    assert "config.json" in repo["commits"][repo["branches"]["v1"]]["files"]
    assert "config.json" not in repo["commits"][repo["branches"]["main"]]["files"]
    assert _remote_bytes(client, "alice/branchy", "config.json", tmp_path, revision="v1") == \
        (checkpoint / "config.json").read_bytes()
    import httpx2

    anonymous = httpx2.get(f"{client.url}/api/models/alice/branchy")
    assert anonymous.status_code == 401 and anonymous.headers["X-Error-Code"] == "RepoNotFound"


def test_transient_errors_are_retried(client, checkpoint):
    client.fail_next("POST", r"/commit/main$", status=503, times=2)
    client.fail_next("GET", r"/api/whoami-v2$", status=0, times=1)  # connection dropped without an answer
    push_to_hub(checkpoint, "alice/flaky", backoff=0.01)
    statuses = [(m, s) for m, p, s in client.requests if p.endswith("/commit/main") or p.endswith("whoami-v2")]
    assert statuses.count(("GET", 0)) == 1 and statuses.count(("POST", 503)) == 2
    assert statuses[-1] == ("POST", 200)
    repo = client.load_repo("alice/flaky")
    assert "model.safetensors" in repo["commits"][repo["branches"]["main"]]["files"]


def test_persistent_server_error_gives_clear_message(client, checkpoint):
    client.fail_next("POST", r"/commit/main$", status=502, times=10)
    with pytest.raises(HFCompressError, match=r"kept failing \(HTTP 502\) after 3 attempt"):
        push_to_hub(checkpoint, "alice/down", max_retries=2, backoff=0.01)


def test_server_down(hub, tmp_path, monkeypatch, checkpoint):
    use_in_process(hub, tmp_path, monkeypatch)
    hub.stop()
    with pytest.raises(HFCompressError, match=r"could not reach the Hub at http://127\.0\.0\.1:\d+ after 2 attempt"):
        push_to_hub(checkpoint, "alice/nowhere", max_retries=1, backoff=0.01)


def test_rejected_and_missing_token(hub, tmp_path, monkeypatch, checkpoint):
    use_in_process(hub, tmp_path, monkeypatch, token="hf_not_a_real_token")
    with pytest.raises(HFCompressError, match=r"rejected the token \(401\)"):
        push_to_hub(checkpoint, "alice/x")
    use_in_process(hub, tmp_path, monkeypatch, token=None)
    with pytest.raises(HFCompressError, match="no Hugging Face token"):
        push_to_hub(checkpoint, "alice/x")
    assert hub.load_repo("alice/x") is None


def test_namespace_of_someone_else(client, checkpoint):
    with pytest.raises(HFCompressError, match=r"not allowed to write to 'bob/new' \(403\)"):
        push_to_hub(checkpoint, "bob/new")
    assert client.load_repo("bob/new") is None
    # bob's existing public repo: creation is skipped (exists), the upload itself is refused.
    from huggingface_hub import HfApi

    HfApi(endpoint=client.url, token="hf_bob_write").create_repo("bob/existing")
    with pytest.raises(HFCompressError, match=r"not allowed to write to 'bob/existing' \(403\)"):
        push_to_hub(checkpoint, "bob/existing")
    repo = client.load_repo("bob/existing")
    assert list(repo["commits"][repo["branches"]["main"]]["files"]) == [".gitattributes"]


def test_bad_input(client, checkpoint, tmp_path):
    with pytest.raises(HFCompressError, match="has no config.json"):
        push_to_hub(tmp_path, "alice/x")
    with pytest.raises(HFCompressError, match="must look like ORG/NAME"):
        push_to_hub(checkpoint, "no-namespace")


def test_repo_survives_server_restart(tmp_path, monkeypatch, checkpoint):
    first = FakeHub(tmp_path / "storage").start()
    use_in_process(first, tmp_path, monkeypatch)
    push_to_hub(checkpoint, "alice/durable")
    port = first.port
    first.stop()
    second = FakeHub(tmp_path / "storage").start(port)
    try:
        assert _remote_bytes(second, "alice/durable", "model.safetensors", tmp_path) == \
            (checkpoint / "model.safetensors").read_bytes()
    finally:
        second.stop()


def test_server_protocol_details(client, tmp_path):
    import httpx2

    api = _api(client)
    api.create_repo("alice/proto")
    with pytest.raises(Exception) as conflict:
        api.create_repo("alice/proto")
    assert conflict.value.response.status_code == 409
    api.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="sub/a.bin", repo_id="alice/proto")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="sub/b.txt", repo_id="alice/proto")
    # resolve: exact sizes, commit and etags; LFS files also carry the linked etag/size.
    head = httpx2.head(f"{client.url}/alice/proto/resolve/main/sub/a.bin")
    assert head.headers["Content-Length"] == "10" and head.headers["X-Linked-Size"] == "10"
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(b"x" * 10).hexdigest()}"'
    assert head.headers["X-Repo-Commit"] == client.load_repo("alice/proto")["branches"]["main"]
    small = httpx2.get(f"{client.url}/alice/proto/resolve/main/sub/b.txt")
    assert small.content == b"hello" and small.headers["ETag"] == f'"{hashlib.sha1(b"blob 5" + bytes([0]) + b"hello").hexdigest()}"'
    missing = httpx2.head(f"{client.url}/alice/proto/resolve/main/nope.txt")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    # tree: folders, recursion, 404 for a missing folder.
    assert sorted(f.path for f in api.list_repo_tree("alice/proto", recursive=True)) == \
        [".gitattributes", "sub", "sub/a.bin", "sub/b.txt"]
    assert sorted(f.path for f in api.list_repo_tree("alice/proto", path_in_repo="sub")) == ["sub/a.bin", "sub/b.txt"]
    assert httpx2.get(f"{client.url}/api/models/alice/proto/tree/main/absent").status_code == 404
    info = api.model_info("alice/proto")
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "sub/a.bin", "sub/b.txt"]
    # An LFS PUT whose content does not match its oid is refused.
    bad = httpx2.put(f"{client.url}/__lfs__/{'0' * 64}/3", content=b"abc")
    assert bad.status_code == 400
    # A commit naming an LFS object that was never uploaded is refused.
    header = json.dumps({"key": "header", "value": {"summary": "x"}})
    op = json.dumps({"key": "lfsFile", "value": {"path": "c.bin", "algo": "sha256", "oid": "1" * 64, "size": 3}})
    refused = httpx2.post(f"{client.url}/api/models/alice/proto/commit/main", content=f"{header}\n{op}\n",
                          headers={"Authorization": "Bearer hf_alice_write", "Content-Type": "application/x-ndjson"})
    assert refused.status_code == 422


def test_cli_push_uses_env_endpoint_and_token(hub, checkpoint, tmp_path, monkeypatch, capsys):
    # A fresh process: huggingface_hub reads HF_ENDPOINT/HF_TOKEN from the environment only.
    hf_compress_cli = Path(sys.executable).parent / "hf-compress"
    env = {**os.environ, **client_env(hub, tmp_path)}
    ok = subprocess.run([str(hf_compress_cli), "push", str(checkpoint), "alice/from-cli", "--revision", "dev"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    repo = hub.load_repo("alice/from-cli")
    assert ok.stdout.strip().endswith(f"/alice/from-cli/commit/{repo['branches']['dev']}")
    # Errors: one line on stderr, exit code 2, no traceback (in-process through the CLI entry point).
    from hf_compress.cli import main

    use_in_process(hub, tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["hf-compress", "push", str(checkpoint), "bob/from-cli"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-compress: error: not allowed to write to 'bob/from-cli' (403)")
    assert "Traceback" not in err


# -- the fake Hub keeps every client inside its storage -------------------------------------------------------------
SECRET = "TOPSECRET-7f3a91"  # in files outside the storage folder and in bob's private repo; no answer may carry it
_HEADER = {"key": "header", "value": {"summary": "crafted"}}


def _ndjson(*operations: dict) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in (_HEADER, *operations)).encode()


def _file_op(path: str, content: bytes = b"hi") -> dict:
    return {"key": "file", "value": {"path": path, "encoding": "base64", "content": base64.b64encode(content).decode()}}


def _raw(hub: FakeHub, method: str, target: str, body: bytes | dict | list | None = None,
         token: str | None = "hf_alice_write", headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """One request sent byte for byte: http.client keeps `..` and `%2e%2e` that httpx would normalise away."""
    payload = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, (dict, list)):
        sent["Content-Type"] = "application/json"
    sent.update(headers or {})
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=30)
    try:
        conn.request(method, target, body=payload, headers=sent)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# (what it tries, method, request target, body, extra headers, token, the Hub's answer)
CRAFTED = [
    ("encoded .. into bob's private repo", "GET", "/api/models/alice/%2e%2e%2Fbob%2Fsecret", None, None, None, 404),
    ("encoded .. into bob's private file", "GET", "/alice/%2e%2e%2Fbob%2Fsecret/resolve/main/weights.txt",
     None, None, None, 404),
    ("second namespace segment", "GET", "/api/models/alice%2F..%2Fbob/secret", None, None, None, 404),
    ("second namespace segment, file", "GET", "/alice%2F..%2Fbob/secret/resolve/main/weights.txt",
     None, None, None, 404),
    ("second namespace segment, plain", "GET", "/api/models/alice/bob%2Fsecret", None, None, None, 404),
    ("a repo file outside storage", "GET", "/api/models/alice/..%2F..%2F..%2Fsecret", None, None, None, 404),
    ("raw .. segments", "GET", "/api/models/alice/../../../secret/tree/main", None, None, None, 404),
    ("double encoding decodes once", "GET", "/api/models/alice/%252e%252e%252Fbob%252Fsecret", None, None, None, 404),
    ("reserved --", "GET", "/api/models/alice/models--bob--secret", None, None, None, 404),
    ("bob's private repo, alice's token", "GET", "/api/models/bob/secret", None, None, None, 404),
    ("bob's private file, alice's token", "GET", "/bob/secret/resolve/main/weights.txt", None, None, None, 404),
    ("bob's private repo, no token", "GET", "/api/models/bob/secret/tree/main", None, None, "", 401),
    ("a commit into bob's private repo", "POST", "/api/models/bob/secret/commit/main",
     _ndjson(_file_op("a.txt")), None, None, 404),
    ("LFS oid ../../x in a commit", "POST", "/api/models/alice/proto/commit/main",
     _ndjson({"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "../../x", "size": 16}}),
     None, None, 400),
    ("LFS oid ../../x in a batch", "POST", "/alice/proto.git/info/lfs/objects/batch",
     {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": "../../x", "size": 16}]}, None, None, 422),
    ("LFS upload to ../../x", "PUT", "/__lfs__/..%2F..%2Fx/16", SECRET.encode(), None, None, 400),
    ("LFS upload with a size that is no number", "PUT", f"/__lfs__/{'a' * 64}/1e3", b"", None, None, 400),
    ("commit path with ..", "POST", "/api/models/alice/proto/commit/main", _ndjson(_file_op("../escape.txt")),
     None, None, 400),
    ("absolute commit path", "POST", "/api/models/alice/proto/commit/main", _ndjson(_file_op("/etc/escape")),
     None, None, 400),
    ("backslash commit path", "POST", "/api/models/alice/proto/commit/main", _ndjson(_file_op("..\\..\\x")),
     None, None, 400),
    ("dot segment in a commit path", "POST", "/api/models/alice/proto/commit/main", _ndjson(_file_op("sub/./a")),
     None, None, 400),
    ("deleting a folder above the repo", "POST", "/api/models/alice/proto/commit/main",
     _ndjson({"key": "deletedFolder", "value": {"path": "../"}}), None, None, 400),
    ("a file path with encoded ..", "GET", "/alice/proto/resolve/main/..%2F..%2F..%2Fx", None, None, None, 404),
    ("a file path with raw ..", "GET", "/alice/proto/resolve/main/../../../x", None, None, None, 404),
    ("a tree folder with ..", "GET", "/api/models/alice/proto/tree/main/..%2F..", None, None, None, 404),
    ("a branch named ..", "POST", "/api/models/alice/proto/branch/..", {}, None, None, 400),
    ("creating a repo named ..", "POST", "/api/repos/create", {"name": "..", "organization": "alice"},
     None, None, 400),
    ("creating a repo in a second namespace", "POST", "/api/repos/create", {"name": "x/../../bob/y"},
     None, None, 400),
    ("a JSON body that is a list", "POST", "/api/repos/create", [1], None, None, 400),
    ("a body that is no JSON", "POST", "/api/models/alice/proto/preupload/main", b"{", None, None, 400),
    ("a preupload size that is no number", "POST", "/api/models/alice/proto/preupload/main",
     {"files": [{"path": "a.txt", "size": "big", "sample": ""}]}, None, None, 400),
    ("a commit line that is no object", "POST", "/api/models/alice/proto/commit/main", b"[1]\n", None, None, 400),
    ("a commit file without a path", "POST", "/api/models/alice/proto/commit/main",
     _ndjson({"key": "file", "value": {"encoding": "base64", "content": ""}}), None, None, 400),
    ("a commit file that is no base64", "POST", "/api/models/alice/proto/commit/main",
     _ndjson({"key": "file", "value": {"path": "a.txt", "encoding": "base64", "content": "%%%"}}), None, None, 400),
    ("paths-info paths that are no list", "POST", "/api/models/alice/proto/paths-info/main", {"paths": 5},
     None, None, 400),
    ("metadata content that is no string", "POST", "/api/validate-yaml", {"content": 5}, None, None, 400),
    ("a Content-Length that is no number", "POST", "/api/repos/create", b"", {"Content-Length": "abc"}, None, 400),
]


def _files_outside(tmp_path: Path) -> dict[str, bytes]:
    """Every file under `tmp_path` but outside the storage folder, with its content."""
    return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and "hub_storage" not in p.relative_to(tmp_path).parts}


@pytest.fixture
def guarded(hub, tmp_path):
    """The server with secrets to steal: `x` and a repo-shaped `secret.json` next to its storage folder (what
    `../../x` and `alice/../../../secret` would reach), and bob's private repo `bob/secret`."""
    from huggingface_hub import HfApi

    (tmp_path / "x").write_text(SECRET)
    fake_repo = {"id": "secret", "private": False, "branches": {"main": "c"}, "created": 0, "note": SECRET,
                 "commits": {"c": {"parent": None, "message": SECRET, "date": 0, "files": {}}}}
    (tmp_path / "secret.json").write_text(json.dumps(fake_repo))
    bob = HfApi(endpoint=hub.url, token="hf_bob_write")
    bob.create_repo("bob/secret", private=True)
    bob.upload_file(path_or_fileobj=SECRET.encode(), path_in_repo="weights.txt", repo_id="bob/secret")
    _api(hub).create_repo("alice/proto")
    return hub


@pytest.mark.parametrize("what,method,target,body,headers,token,status", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_request_gets_a_clean_4xx_and_reads_nothing_outside_storage(
        guarded, tmp_path, what, method, target, body, headers, token, status):
    outside = _files_outside(tmp_path)
    proto = guarded.load_repo("alice/proto")
    got, answer_headers, answer = _raw(guarded, method, target, body, headers=headers,
                                       token="hf_alice_write" if token is None else token)
    assert got == status, (what, got, answer)
    assert guarded.errors == []  # no request got the dispatcher's 500: every refusal was foreseen
    assert json.loads(answer)["error"] == answer_headers["X-Error-Message"]
    assert SECRET not in answer.decode(errors="replace") + json.dumps(answer_headers)
    # Nothing was written outside storage, nothing inside it points out, and the target repo is unchanged.
    assert _files_outside(tmp_path) == outside
    assert guarded.load_repo("alice/proto") == proto
    # The server still answers on a fresh connection (no handler thread died, no lock left held).
    assert _raw(guarded, "GET", "/api/whoami-v2")[0] == 200


def test_private_repo_is_visible_only_to_its_owner(guarded):
    weights = "/bob/secret/resolve/main/weights.txt"
    assert _raw(guarded, "GET", weights, token="hf_bob_write")[2] == SECRET.encode()
    assert _raw(guarded, "GET", weights)[0] == 404  # alice: hidden, not forbidden
    assert _raw(guarded, "GET", weights, token="")[0] == 401
    # Writing is refused with the same 404 before any 403 could confirm the repo exists.
    status, headers, _ = _raw(guarded, "POST", "/api/models/bob/secret/preupload/main",
                              {"files": [{"path": "a.txt", "size": 2, "sample": ""}]})
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_storage_paths_that_resolve_outside_are_refused(guarded, tmp_path):
    # Validation passes these names; only the resolved path shows that a symlink leads out of the storage folder.
    oid = "f" * 64  # a well-formed oid no upload has used
    (guarded.root / "objects" / oid).symlink_to(tmp_path / "x")
    (guarded.root / "repos" / "mallory").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(HubError) as refused:
        guarded.read_object(oid)
    assert refused.value.status == 404
    with pytest.raises(HubError):
        guarded.load_repo("mallory/secret")
    for target in ("/api/models/mallory/secret", "/api/models/mallory/secret/tree/main"):
        status, _, body = _raw(guarded, "GET", target)
        assert status == 404 and SECRET not in body.decode()
    assert guarded.errors == []


def test_unexpected_server_error_is_a_short_500(hub, monkeypatch):
    def broken(repo_id: str) -> dict:
        raise RuntimeError("storage exploded")

    monkeypatch.setattr(hub, "load_repo", broken)
    status, headers, body = _raw(hub, "GET", "/api/models/alice/anything")
    assert (status, json.loads(body)) == (500, {"error": "Internal Error"})
    assert headers["X-Error-Message"] == "Internal Error" and "storage exploded" not in body.decode()
    assert len(hub.errors) == 1 and "RuntimeError: storage exploded" in hub.errors[0]
    assert _raw(hub, "GET", "/api/whoami-v2")[0] == 200


@pytest.mark.parametrize("repo_id,valid", [
    ("alice/tiny-sb", True), ("acme/Model_v1.2", True), ("a/b", True), ("alice/..", False), ("../bob", False),
    ("alice/x/y", False), ("alice", False), ("alice/a..b", False), ("alice/models--x", False), ("alice/x.git", False),
    ("alice/.hidden", False), ("alice/x-", False), ("alice/%2e%2e", False), ("alice/é", False), ("alice/x\n", False),
    ("alice/" + "x" * 97, False), ("alice/" + "x" * 96, True),
])
def test_repo_ids_as_the_hub_accepts_them(repo_id, valid):
    assert is_repo_id(repo_id) is valid


# -- the client side: each refusal of the Hub is one clear error that says what to do ------------------------------
def _refused_by_token(hub, monkeypatch, tmp_path) -> str:
    use_in_process(hub, tmp_path, monkeypatch, token="hf_not_a_real_token")
    return "alice/x"


def _refused_namespace(hub, monkeypatch, tmp_path) -> str:
    return "bob/new"


def _private_repo_of_bob(hub, monkeypatch, tmp_path) -> str:
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url, token="hf_bob_write").create_repo("bob/hidden", private=True)
    return "bob/hidden"


def _repo_gone(hub, monkeypatch, tmp_path) -> str:
    # The repo disappears between its creation and the upload (deleted, or moved out of the token's reach).
    hub.fail_next("POST", r"^/api/models/alice/gone/preupload/main$", 404, message="Repository not found",
                  code="RepoNotFound")
    return "alice/gone"


def _conflict(hub, monkeypatch, tmp_path) -> str:
    hub.fail_next("POST", r"^/api/models/alice/busy/commit/main$", 409,
                  message="Another commit is in progress on this branch")
    return "alice/busy"


@pytest.mark.parametrize("setup,message", [
    (_refused_by_token, r"^the Hub at http://127\.0\.0\.1:\d+ rejected the token \(401\): set HF_TOKEN to a valid "
                        r"token with write access"),
    (_refused_namespace, r"^not allowed to write to 'bob/new' \(403\): 'bob' is neither the token's user nor .*; "
                         r"push to your own namespace or use a token that can write there$"),
    # create_repo is refused (403) first, and the repo stays hidden (404): the push reports the refusal.
    (_private_repo_of_bob, r"^not allowed to write to 'bob/hidden' \(403\)"),
    (_repo_gone, r"^'alice/gone' was not found on http://127\.0\.0\.1:\d+ \(404\) or the token cannot see it: check "
                 r"the repo id and --revision, or use a token of an account that can see the repo"),
    (_conflict, r"^the Hub refused the push to 'alice/busy' with a conflict \(409: Another commit is in progress on "
                r"this branch\): another upload or branch change reached the repo first; wait for it to finish, "
                r"then push again"),
], ids=["401", "403", "403-private", "404", "409"])
def test_hub_refusal_is_one_clear_error(client, checkpoint, tmp_path, monkeypatch, setup, message):
    repo_id = setup(client, monkeypatch, tmp_path)
    with pytest.raises(HFCompressError) as refused:
        push_to_hub(checkpoint, repo_id, backoff=0.01)
    assert re.search(message, str(refused.value)), str(refused.value)
    assert "\n" not in str(refused.value)
    # A refusal is final: no retry, and no commit beyond the repo's initial one.
    posts = [p for m, p, s in client.requests if m == "POST" and re.search(r"/(commit|preupload)/", p)]
    assert len(posts) == len(set(posts))
    repo = client.load_repo(repo_id)
    assert repo is None or all(c["parent"] is None for c in repo["commits"].values())


def test_cli_conflict_is_one_line_with_exit_code_2(hub, checkpoint, tmp_path):
    hub.fail_next("POST", r"^/api/models/alice/busy/commit/main$", 409,
                  message="Another commit is in progress on this branch")
    env = {**os.environ, **client_env(hub, tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hf_compress.cli", "push", str(checkpoint), "alice/busy"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "hf-compress: error: the Hub refused the push to 'alice/busy' with a conflict (409: Another commit is in "
        "progress on this branch): another upload or branch change reached the repo first; wait for it to finish, "
        "then push again (files already there are not uploaded twice)"
    ]
    assert proc.stdout == ""
    assert [s for m, p, s in hub.requests if p == "/api/models/alice/busy/commit/main"] == [409]
