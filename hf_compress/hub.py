"""Publishing a finished checkpoint folder to the Hugging Face Hub in one commit (`push_to_hub`).

The repo (and a missing branch `revision`) is created if needed, then the folder is uploaded: weights, config with
`auto_map`, remote-code files, tokenizer or image processor, generation config and model card, but not local state
(`IGNORE_PATTERNS`: pruning iterations, caches, temporary and lock files). A card hf-compress generated, or a missing
one, is (re)written first so that its usage snippets load the repo; a hand-edited card is uploaded unchanged, and
nothing is ever downloaded, so the Hub's card is the local one. The repo then loads with the stock
`from_pretrained(..., trust_remote_code=True)`, or without the flag where hf-compress is installed. Transient failures
(timeouts, rate limits, server errors, dropped connections) are retried; a refusal (token, permission, conflict, card
metadata) or a failure that outlives the retries is one `HFCompressError` line that says what to do.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .errors import HFCompressError

logger = logging.getLogger(__name__)

# Statuses worth another try: timeouts, rate limits and server-side failures.
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# Files of a checkpoint folder that must not be published (local state, not part of the model).
# iterations/: class-aware pruning keeps per-iteration checkpoints there for resuming; they are not the model.
IGNORE_PATTERNS = ["iterations/**", ".cache/**", "**/.cache/**", "*.tmp", "**/__pycache__/**", ".ipynb_checkpoints/**", "*.lock"]
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _endpoint() -> str:
    # Read at call time: `huggingface_hub.constants.ENDPOINT` is frozen when the library is imported.
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _httpx():
    # huggingface_hub 2.x ships its HTTP client as `httpx2`; 1.x used `httpx`.
    try:
        import httpx2
    except ImportError:
        import httpx as httpx2
    return httpx2


def _is_transient(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    httpx2 = _httpx()
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return err.response.status_code in TRANSIENT_STATUS
    # Connection refused/reset, a dropped connection, a timeout; also when wrapped by the LFS uploader.
    if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return True
    return err.__cause__ is not None and _is_transient(err.__cause__)


def _one_line(text: object) -> str:
    """`text` on one line: the client's messages span several (request id, server detail), and the CLI prints
    exactly one line per error."""
    return " ".join(str(text).split())


def _explain(err: BaseException, repo_id: str, endpoint: str, attempts: int) -> HFCompressError:
    """Turns a client error into a one-line message that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    namespace = repo_id.split("/")[0]
    if status == 401:
        return HFCompressError(
            f"the Hub at {endpoint} rejected the token (401): set HF_TOKEN to a valid token with write access "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`"
        )
    if status == 403:
        return HFCompressError(
            f"not allowed to write to {repo_id!r} (403): {namespace!r} is neither the token's user nor one of its "
            "organizations with write access; push to your own namespace or use a token that can write there"
        )
    if status == 404:
        # The Hub answers 404 both for a missing repo and for a private one the token may not see.
        return HFCompressError(
            f"{repo_id!r} was not found on {endpoint} (404) or the token cannot see it: check the repo id and "
            "--revision, or use a token of an account that can see the repo (private repos are hidden from others)"
        )
    if status in (409, 412):
        # A conflict (or a stale parent commit): someone else changed the repo or branch while this push ran.
        detail = _one_line(getattr(err, "server_message", None) or "conflict")
        return HFCompressError(
            f"the Hub refused the push to {repo_id!r} with a conflict ({status}: {detail}): another upload or branch "
            "change reached the repo first; wait for it to finish, then push again (files already there are not "
            "uploaded twice)"
        )
    validating = status == 400 and str(err.response.request.url).endswith("/api/validate-yaml")
    if validating or (isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err)):
        return HFCompressError(f"the Hub refused the model card's metadata: {_one_line(err)}")
    if status in TRANSIENT_STATUS:
        return HFCompressError(f"the Hub at {endpoint} kept failing (HTTP {status}) after {attempts} attempt(s); "
                               "try again later")
    if _is_transient(err):
        return HFCompressError(f"could not reach the Hub at {endpoint} after {attempts} attempt(s) "
                               f"({type(err).__name__}: {_one_line(err)}); check the network or HF_ENDPOINT and "
                               "try again")
    return HFCompressError(f"push of {repo_id!r} to {endpoint} failed: {_one_line(err)}")


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    max_retries: int = 4,
    backoff: float = 2.0,
) -> str:
    """Uploads a checkpoint folder to `repo_id` in one commit and returns the commit URL.

    Creates the repo if needed (`private` only applies then) and the branch `revision` if it is missing. Honours
    `HF_ENDPOINT` and `HF_TOKEN` (or a token saved by `hf auth login`). Transient failures (5xx, 408, 429, dropped or
    refused connections) are retried `max_retries` times, waiting `backoff * 2**attempt` seconds; re-running the
    whole upload is safe because the Hub skips files it already has. A missing card, or one hf-compress generated, is
    (re)written first so its usage snippets load `repo_id` (see `hf_compress.cards`); a hand-edited card is uploaded
    unchanged. Nothing is downloaded, so the Hub's card is always the local one.

    Raises:
        HFCompressError: bad folder or repo id, missing or rejected token (401), a namespace the token cannot
            write to (403), a repo the token cannot see (404), a conflicting change on the Hub (409/412), metadata
            the Hub refuses, or a network failure that outlived the retries.
    """
    from huggingface_hub import HfApi

    folder = _check_push_request(model_dir, repo_id)
    token = _resolve_token(token)
    _refresh_card(folder, repo_id)
    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload {folder.name} with hf-compress"
    upload = partial(_upload_once, api, folder, repo_id, private=private, revision=revision, message=message)
    return _with_retries(upload, repo_id, endpoint, max_retries=max_retries, backoff=backoff)


def _check_push_request(model_dir: str | os.PathLike, repo_id: str) -> Path:
    """The checkpoint folder, once it and the repo id are known to be well-formed."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise HFCompressError(f"{folder} is not a checkpoint folder: it has no config.json")
    if not _REPO_ID_RE.match(repo_id):
        raise HFCompressError(f"repo id {repo_id!r} must look like ORG/NAME (letters, digits, '-', '_', '.')")
    return folder


def _resolve_token(token: str | None) -> str:
    """`token`, else HF_TOKEN or the token saved by `hf auth login`."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HFCompressError("no Hugging Face token: set HF_TOKEN or run `hf auth login` before pushing")
    return token


def _refresh_card(folder: Path, repo_id: str) -> None:
    """Re-renders a card hf-compress generated (or writes a missing one) so its usage snippets name the repo; a
    hand-edited card (marker line removed) is uploaded exactly as it is."""
    from .cards import is_generated_card, write_model_card

    if not (folder / "README.md").exists() or is_generated_card(folder):
        write_model_card(folder, repo_id=repo_id)


def _upload_once(api, folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str) -> str:
    """One complete push: token check, repo and branch creation, upload of the folder in one commit."""
    api.whoami()  # fails fast on a bad token, before hashing and uploading anything
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message,
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return info.commit_url or info.oid


def _with_retries(upload: Callable[[], str], repo_id: str, endpoint: str, *, max_retries: int,
                  backoff: float) -> str:
    """Runs `upload`, retrying transient failures; a failure it gives up on becomes an explained error."""
    for tries in range(max_retries + 1):
        try:
            return upload()
        except HFCompressError:
            raise
        except Exception as err:
            if tries < max_retries and _is_transient(err):
                wait = backoff * 2**tries
                logger.warning("push to %s failed (%s); retrying in %.1fs [%d/%d]", endpoint, err, wait, tries + 1,
                               max_retries)
                time.sleep(wait)
                continue
            explained = _explained_failure(err, repo_id, endpoint, tries + 1)
            if explained is None:
                raise  # not a client error: a bug, which keeps its traceback
            raise explained from err
    raise AssertionError("unreachable")


def _explained_failure(err: Exception, repo_id: str, endpoint: str, attempts: int) -> HFCompressError | None:
    """The error to raise for a client error (also when the LFS uploader wraps it) or the Hub's metadata refusal;
    None for anything else."""
    from huggingface_hub.errors import HfHubHTTPError

    client_errors = (HfHubHTTPError, _httpx().HTTPError, ConnectionError, TimeoutError)
    if isinstance(err, client_errors) or _is_transient(err) or "Invalid metadata in README.md" in str(err) \
            or isinstance(err.__cause__, client_errors):
        cause = err.__cause__ if isinstance(err.__cause__, HfHubHTTPError) else err
        return _explain(cause, repo_id, endpoint, attempts)
    return None
