"""Publish a release on the Hugging Face Hub: stage its files, then upload them as one commit.

The staged folder is what ``flatopt.LearnedOptimizer(params, "owner/name")`` later downloads:
the release's ``model.safetensors`` and ``config.json`` byte for byte, its model card with the
Hub's YAML metadata in front, and ``results.json``, the release's evaluation on its own so that the
numbers can be read without knowing the config's layout.
"""

import json
import pathlib
import re
import shutil
import tempfile

import flatopt
from flatopt.weights import CONFIG_FILE, WEIGHTS_FILE

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
DEFAULT_REVISION = "main"
TAGS = ["flatopt", "learned-optimizer", "flatness", "pytorch"]
# Every release is meta-trained and evaluated on MNIST (see training.meta and training.release).
DATASETS = ["mnist"]

_FRONT_MATTER = re.compile(r"\s*---[ \t]*\r?\n")


def push_command(
    release,
    repo_id,
    *,
    dry_run=None,
    revision=DEFAULT_REVISION,
    private=False,
    token=None,
    message=None,
):
    """Run ``python -m training push``: stage a release and upload it, or only write it out.

    Args:
        release: A bundled release name or a release folder.
        repo_id: The Hub model repository, ``owner/name``.
        dry_run: If given, a folder to write the staged files to instead of uploading them.
        revision: The branch to commit to, created from ``main`` if missing.
        private: Create the repository as private.
        token: A Hub access token; ``None`` uses huggingface_hub's own lookup.
        message: The commit message; ``None`` names the release.

    Raises:
        ValueError: If ``repo_id`` is malformed or the release is broken.
        OSError: If a file cannot be written, or the Hub refuses the push or cannot be reached.
    """
    check_repo_id(repo_id)
    if dry_run is not None:
        name, files = stage_release(release, dry_run)
        print(f"staged release {name!r} for {repo_id} in {dry_run} (nothing uploaded):")
        for path in files:
            print(f"  {path}  ({path.stat().st_size:,} bytes)")
        return

    print(f"pushing release {release!r} to {repo_id} (revision {revision}) ...", flush=True)
    commit = push_release(
        release, repo_id, revision=revision, private=private, token=token, message=message
    )
    print(f"commit {commit.oid}")
    print(commit.commit_url)
    print(f'load it with flatopt.LearnedOptimizer(params, "{repo_id}@{commit.oid}")')


def check_repo_id(repo_id):
    """Refuse anything but a Hub repository id ``owner/name``.

    Raises:
        ValueError: Naming the id and the rule it breaks.
    """
    from huggingface_hub.utils import validate_repo_id

    # validate_repo_id also accepts a bare name, which the Hub would file under the token's user.
    owner, _, name = repo_id.partition("/")
    problem = None if owner and name else "it needs both an owner and a name"
    if problem is None:
        try:
            validate_repo_id(repo_id)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise ValueError(
            f"--repo-id {repo_id!r} is not a Hub repository id of the form 'owner/name': {problem}"
        )


def stage_release(release, folder):
    """Write the files to publish for a release into a new or empty folder.

    The release is loaded first, so that a broken one is refused before anything is written.

    Args:
        release: Anything :func:`flatopt.resolve_weights` accepts.
        folder: Where to write; created if missing, refused if it exists and is not empty.

    Returns:
        ``(name, paths)``: the release's name and the staged files, sorted.

    Raises:
        ValueError: If the release does not load.
        FileNotFoundError: If the release has no model card.
        FileExistsError: If ``folder`` exists and is not an empty folder.
    """
    source = flatopt.resolve_weights(release)
    _, config = flatopt.load_release(source)
    if not (source / CARD_FILE).is_file():
        raise FileNotFoundError(
            f"{source} has no {CARD_FILE} model card, which would be the repository's page; "
            "export the release with `python -m training train`, or write one."
        )
    folder = pathlib.Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists and is not an empty folder; name a new or empty one to stage into"
        )
    folder.mkdir(parents=True, exist_ok=True)

    name = config.get("name") or source.name
    for file in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(source / file, folder / file)
    card = (source / CARD_FILE).read_text(encoding="utf-8")
    (folder / CARD_FILE).write_text(card_with_metadata(card, config), encoding="utf-8")
    results = {"release": name, "evaluation": config.get("evaluation", {})}
    if "held_out_results" in config:  # the comparison with tuned Adam, where one was made
        results["held_out_results"] = config["held_out_results"]
    (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return name, sorted(folder.iterdir())


def card_with_metadata(card, config):
    """Put the Hub's YAML metadata block in front of a model card that has none.

    A card that already starts with a ``---`` block is returned unchanged: it is its author's.
    """
    if _FRONT_MATTER.match(card):
        return card
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        library_name="flatopt",
        # The Hub knows licenses by lower-case identifiers such as "mit" and "apache-2.0".
        license=config.get("license", "").lower() or None,
        tags=TAGS,
        datasets=DATASETS,
    )
    return f"---\n{metadata.to_yaml()}\n---\n\n{card}"


def push_release(
    release, repo_id, *, revision=DEFAULT_REVISION, private=False, token=None, message=None
):
    """Upload a release to a Hub model repository as one commit, creating what is missing.

    Args:
        release: Anything :func:`flatopt.resolve_weights` accepts.
        repo_id: The Hub model repository, ``owner/name``; created if missing.
        revision: The branch to commit to, created from ``main`` if missing.
        private: Create the repository as private; an existing one keeps its visibility.
        token: A Hub access token; ``None`` uses huggingface_hub's own lookup.
        message: The commit message; ``None`` names the release.

    Returns:
        huggingface_hub's ``CommitInfo``, with the commit's ``oid`` and ``commit_url``.

    Raises:
        ValueError: If ``repo_id`` is malformed or the release is broken.
        OSError: If the Hub refuses or cannot be reached, naming the repository and the step.
    """
    check_repo_id(repo_id)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError derives from the HTTP client's own base error (requests' or httpx's, depending
    # on the huggingface_hub version), which also covers refused connections and timeouts.
    hub_errors = (ValueError, OSError, *HfHubHTTPError.__bases__)
    with tempfile.TemporaryDirectory(prefix="flatopt-push-") as staging:
        name, _ = stage_release(release, staging)
        api = HfApi(token=token)
        step = "creating the repository"
        try:
            # None rather than False, so that a new repository gets its owner's default visibility.
            api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
            if revision != DEFAULT_REVISION:
                step = f"creating the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            step = "uploading the files"
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                repo_type="model",
                revision=revision,
                commit_message=message or f"Upload flatopt release {name}",
            )
        except hub_errors as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                detail += "; check that the token (HF_TOKEN, `hf auth login` or --token) may write"
            raise OSError(
                f"could not push release {name!r} to {repo_id} on {api.endpoint}: {step} failed: "
                f"{detail}"
            ) from exc
