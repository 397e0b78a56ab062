"""Publish a verified folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from .cli import first_line

DEFAULT_COMMIT_MESSAGE = "Upload MT3 converted with convert-mt3"


class HubError(RuntimeError):
    """Authentication or network failure while pushing; the local folder is untouched."""


def _redact(message: str) -> str:
    token = get_token()
    return message.replace(token, "***") if token else message


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """create_repo(exist_ok) + upload_folder of exactly `folder`; returns the repo URL.

    The token comes from `HF_TOKEN` or the cached login (huggingface_hub's own lookup); it is
    never printed or logged: error messages are redacted before they are raised. Re-running
    uploads the same files, which the Hub records as an empty (no-op) commit. `private` is checked,
    not assumed: an existing public repo is refused rather than given the files.
    """
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="model").private:
            # create_repo(exist_ok) keeps an existing repo's visibility: never upload public what was asked private
            raise HubError(f"push to {repo_id}: --private, but the repo exists and is public; nothing uploaded")
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
        )
    except HubError:
        raise
    except LocalTokenNotFoundError:
        raise HubError(f"push to {repo_id}: not logged in; set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        raise HubError(_redact(f"push to {repo_id} failed (HTTP {status}): {first_line(err)}")) from None
    except Exception as err:  # connection errors: the HTTP client's own exception types
        raise HubError(_redact(f"push to {repo_id} failed: {type(err).__name__}: {first_line(err)}")) from None
    base = str(getattr(url, "url", None) or f"https://huggingface.co/{repo_id}")
    return f"{base}/tree/{revision}" if revision else base


__all__ = ["HubError", "push_folder"]
