"""Publishing to the Hub, against the local fake Hub in tests/hub_server.py (unmodified huggingface_hub client)."""

from __future__ import annotations

import hashlib
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
from hub_server import FakeHub, client_env, use_in_process  # noqa: E402

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
