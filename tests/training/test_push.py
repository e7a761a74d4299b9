"""``python -m training push`` against a local stand-in for the Hugging Face Hub, then back again.

The stand-in answers the HTTP calls huggingface_hub makes to create a repository, commit files
sent inline (no LFS or Xet storage) and download a snapshot, and keeps every repository in memory.
The first push and the download run in subprocesses whose ``HF_ENDPOINT`` points at it, as a
user's would; the other cases call the command line in this process, pointed at it the same way.
"""

import base64
import hashlib
import http.server
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import urllib.parse

import huggingface_hub.constants
import pytest
import yaml

from flatopt.weights import bundled_release
from training.__main__ import main
from training.hub import stage_release

ROOT = pathlib.Path(__file__).resolve().parents[2]
RELEASE = "dm"
REPO = "someone/flatopt-dm"
STAGED = ["README.md", "config.json", "model.safetensors", "results.json"]

# `python -m training`, except that the checkout is appended to sys.path rather than put first, so
# that flatopt still comes from the installed wheel, as in these tests (see tests/conftest.py).
CLI = (
    f"import runpy, sys; sys.path.append({str(ROOT)!r}); "
    "runpy.run_module('training', run_name='__main__', alter_sys=True)"
)
ROUND_TRIP = """
import sys, torch, flatopt
steps = []
for weights in sys.argv[1:]:
    param = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 7))
    param.grad = torch.linspace(0.5, -0.25, 7)
    flatopt.LearnedOptimizer([param], weights).step()
    steps.append(param.detach().clone())
print("same step" if torch.equal(*steps) else f"different steps: {steps}")
"""


def error(status, message, headers=None):
    """A Hub error answer: the message goes in the JSON body and the header the client reads."""
    return status, {"error": message}, {"X-Error-Message": message, **(headers or {})}


def blob_oid(content):
    """The git blob id of a file's content, which the Hub reports for files stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class StandInHub:
    """An in-memory model Hub speaking the part of the Hub's HTTP API that huggingface_hub uses.

    Attributes:
        url: The endpoint to give huggingface_hub.
        repos: ``{repo id: {"refs": {branch: commit}, "trees": {commit: {path: bytes}},
            "visibility": as asked at creation}}``.
        requests: ``(method, path)`` of every request received, in order.
        commits: ``{"repo", "revision", "summary", "files"}`` of every commit received.
        refuse_commits: If set, an HTTP status to answer commits with.
    """

    API = re.compile(
        r"^/api/models/(?P<repo>[^/]+/[^/]+)"
        r"(?:/(?P<action>preupload|commit|branch|revision|tree)/(?P<revision>[^/]+))?$"
    )
    RESOLVE = re.compile(
        r"^/(?P<repo>[^/]+/[^/]+)/(?P<action>resolve)/(?P<revision>[^/]+)/(?P<path>.+)$"
    )

    def __init__(self):
        self.repos, self.requests, self.commits = {}, [], []
        self.refuse_commits = None
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()

    def handle(self, request):
        url = urllib.parse.urlsplit(request.path)
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append((request.command, url.path))
            status, payload, headers = self._route(request.command, url.path, body)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **headers}
        request.send_response(status)
        for key, value in {"Content-Length": str(len(payload)), **headers}.items():
            request.send_header(key, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)

    def _route(self, method, path, body):
        if (method, path) == ("POST", "/api/repos/create"):
            return self._create_repo(json.loads(body))
        if (method, path) == ("POST", "/api/validate-yaml"):
            return self._validate_yaml(json.loads(body)["content"])
        match = self.API.match(path) or self.RESOLVE.match(path)
        if match is None:
            return error(404, f"the stand-in Hub has no {method} {path}")
        repo = self.repos.get(match["repo"])
        if repo is None:
            return error(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        revision = urllib.parse.unquote(match["revision"] or "main")
        action = match["action"]
        if (method, action) == ("POST", "branch"):
            return self._create_branch(repo, revision, json.loads(body or b"{}"))
        commit = repo["refs"].get(revision, revision if revision in repo["trees"] else None)
        if commit is None:
            return error(404, "Invalid rev id", {"X-Error-Code": "RevisionNotFound"})
        tree = repo["trees"][commit]
        if (method, action) == ("POST", "preupload"):
            files = [self._upload_mode(tree, f["path"]) for f in json.loads(body)["files"]]
            return 200, {"files": files}, {}
        if (method, action) == ("POST", "commit"):
            return self._commit(match["repo"], revision, body)
        if method == "GET" and action in (None, "revision"):
            siblings = [{"rfilename": p} for p in tree]
            return 200, {"id": match["repo"], "sha": commit, "siblings": siblings}, {}
        if method == "GET" and action == "tree":
            entries = [
                {"type": "file", "path": p, "size": len(c), "oid": blob_oid(c)}
                for p, c in tree.items()
            ]
            return 200, entries, {}
        if method in ("GET", "HEAD") and action == "resolve":
            return self._resolve(tree, commit, urllib.parse.unquote(match["path"]))
        return error(405, f"the stand-in Hub has no {method} {path}")

    def _create_repo(self, spec):
        repo_id = f"{spec['organization']}/{spec['name']}"
        if repo_id in self.repos:
            # With exist_ok, the client takes this answer's url as the repository's.
            status, body, headers = error(409, "You already created this model repo")
            return status, {**body, "url": f"{self.url}/{repo_id}"}, headers
        self.repos[repo_id] = {"refs": {}, "trees": {}, "visibility": spec.get("visibility")}
        # Like the Hub, start every repository with a first commit of its attributes file.
        self._add_commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs -text\n"})
        return 200, {"url": f"{self.url}/{repo_id}"}, {}

    def _validate_yaml(self, card):
        front = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
        if front and not isinstance(yaml.safe_load(front[1]), dict):
            return 400, {"errors": [{"message": "metadata is not a YAML mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _create_branch(self, repo, branch, spec):
        if branch in repo["refs"]:
            return error(409, "Reference already exists")
        start = spec.get("startingPoint") or "main"
        repo["refs"][branch] = repo["refs"].get(start, start)
        return 200, {}, {}

    @staticmethod
    def _upload_mode(tree, path):
        # Every file goes inline in the commit; the oid lets the client leave unchanged files out.
        oid = blob_oid(tree[path]) if path in tree else None
        return {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid}

    def _commit(self, repo_id, revision, body):
        if self.refuse_commits:
            return error(self.refuse_commits, "Invalid credentials")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = {}
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return error(400, f"the stand-in Hub takes inline files only, not {line['key']}")
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = self._add_commit(repo_id, revision, files)
        summary = lines[0]["value"]["summary"]
        self.commits.append(
            {"repo": repo_id, "revision": revision, "summary": summary, "files": files}
        )
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}, {}

    def _add_commit(self, repo_id, branch, files):
        repo = self.repos[repo_id]
        parent = repo["refs"].get(branch)
        tree = {**repo["trees"].get(parent, {}), **files}
        oid = hashlib.sha1(f"{repo_id} {len(repo['trees'])}".encode()).hexdigest()
        repo["trees"][oid], repo["refs"][branch] = tree, oid
        return oid

    @staticmethod
    def _resolve(tree, commit, path):
        if path not in tree:
            return error(404, "Entry not found", {"X-Error-Code": "EntryNotFound"})
        # The client insists on both: the commit pins the cache folder, the ETag names the blob.
        headers = {"X-Repo-Commit": commit, "ETag": f'"{blob_oid(tree[path])}"'}
        return 200, tree[path], headers


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hub.handle(self)

    do_HEAD = do_POST = do_GET

    def log_message(self, *args):
        pass  # the test reports what matters


def copy_release(folder, card):
    """The bundled release's weights and config in ``folder``, with another model card."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((bundled_release(RELEASE) / name).read_bytes())
    (folder / "README.md").write_text(card)
    return folder


@pytest.fixture(scope="module")
def hub():
    server = StandInHub()
    yield server
    server.close()


def hub_environment(hub, home):
    """The environment of a user whose huggingface_hub talks to the stand-in, logged in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_TOKEN": "hf_stand_in_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }


def run_python(hub, home, *args):
    return subprocess.run(
        [sys.executable, *args],
        env=hub_environment(hub, home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """The command line's first push of the bundled release: ``(HF_HOME, process, commit)``."""
    home = tmp_path_factory.mktemp("user") / "hf-home"
    result = run_python(hub, home, "-c", CLI, "push", RELEASE, "--repo-id", REPO)
    assert result.returncode == 0, result.stderr
    return home, result, hub.repos[REPO]["refs"]["main"]


def use_endpoint(monkeypatch, url):
    """Point this process's huggingface_hub at ``url``, online and logged in."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)


@pytest.fixture
def hub_in_process(hub, monkeypatch):
    """The stand-in, with this process's huggingface_hub pointed at it."""
    use_endpoint(monkeypatch, hub.url)
    return hub


def error_line(argv, capsys):
    """Run the command line, expecting it to fail as main() reports errors; return its one line."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


def test_push_commits_exactly_the_staged_release(hub, pushed):
    _, result, commit = pushed
    assert f"commit {commit}" in result.stdout
    assert f"{hub.url}/{REPO}/commit/{commit}" in result.stdout
    assert hub.repos[REPO]["visibility"] is None  # the owner's default

    (received,) = [c for c in hub.commits if c["repo"] == REPO]
    assert sorted(received["files"]) == STAGED
    assert RELEASE in received["summary"]
    files, release = received["files"], bundled_release(RELEASE)
    assert files["model.safetensors"] == (release / "model.safetensors").read_bytes()
    assert files["config.json"] == (release / "config.json").read_bytes()
    config = json.loads(files["config.json"])
    expected = {"release": RELEASE, "evaluation": config["evaluation"]}
    if "held_out_results" in config:
        expected["held_out_results"] = config["held_out_results"]
    assert json.loads(files["results.json"]) == expected

    card = files["README.md"].decode()
    front = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    metadata = yaml.safe_load(front[1])
    assert metadata["library_name"] == "flatopt"
    assert metadata["license"] == config["license"].lower()
    assert "learned-optimizer" in metadata["tags"] and metadata["datasets"] == ["mnist"]
    assert card.endswith((release / "README.md").read_text())


def test_pushed_release_loads_through_the_hub_and_steps_like_the_bundled_one(hub, pushed):
    home, _, commit = pushed
    result = run_python(hub, home, "-c", ROUND_TRIP, f"{REPO}@{commit}", RELEASE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "same step"
    assert ("GET", f"/{REPO}/resolve/{commit}/model.safetensors") in hub.requests


def test_second_push_to_the_same_repository_succeeds(hub_in_process, pushed, capsys):
    _, _, commit = pushed
    main(["push", RELEASE, "--repo-id", REPO])
    # Nothing changed, so the client makes no new commit and reports the branch's head.
    assert f"commit {commit}" in capsys.readouterr().out
    assert hub_in_process.repos[REPO]["refs"]["main"] == commit


def test_push_to_a_new_branch_commits_only_what_changed(hub_in_process, pushed, tmp_path, capsys):
    release = copy_release(tmp_path / "release", "# An edited card\n")
    main(
        ["push", str(release), "--repo-id", REPO, "--revision", "v1", "--message", "Edit the card"]
    )

    received = hub_in_process.commits[-1]
    assert (received["revision"], received["summary"]) == ("v1", "Edit the card")
    assert sorted(received["files"]) == ["README.md"]
    assert f"commit {hub_in_process.repos[REPO]['refs']['v1']}" in capsys.readouterr().out
    assert hub_in_process.repos[REPO]["refs"]["main"] == pushed[2]


def test_dry_run_writes_what_a_push_sends_and_sends_nothing(
    hub_in_process, pushed, tmp_path, capsys
):
    before = len(hub_in_process.requests)
    main(["push", RELEASE, "--repo-id", REPO, "--dry-run", str(tmp_path / "staged")])

    (first_push, *_) = [c for c in hub_in_process.commits if c["repo"] == REPO]
    staged = {p.name: p.read_bytes() for p in (tmp_path / "staged").iterdir()}
    assert staged == first_push["files"]
    assert "nothing uploaded" in capsys.readouterr().out
    assert len(hub_in_process.requests) == before


def test_dry_run_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    line = error_line(["push", RELEASE, "--repo-id", REPO, "--dry-run", str(tmp_path)], capsys)
    assert "not an empty folder" in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_card_with_front_matter_gets_no_second_one(tmp_path):
    card = "---\nlicense: mit\n---\n\n# Mine\n"
    stage_release(copy_release(tmp_path / "release", card), tmp_path / "staged")
    assert (tmp_path / "staged/README.md").read_text() == card


@pytest.mark.parametrize(
    "repo_id", ["flatopt-dm", "someone/flatopt/dm", "some--one/flatopt", "someone/dm@v1"]
)
def test_a_bad_repository_id_is_one_error_line(repo_id, hub_in_process, capsys):
    before = len(hub_in_process.requests)
    line = error_line(["push", RELEASE, "--repo-id", repo_id], capsys)
    assert line.startswith("error: --repo-id") and repo_id in line
    assert len(hub_in_process.requests) == before


def test_a_refused_commit_is_one_error_line_naming_the_repository(hub_in_process, capsys):
    hub_in_process.refuse_commits = 401
    try:
        line = error_line(["push", RELEASE, "--repo-id", "someone/refused", "--private"], capsys)
    finally:
        hub_in_process.refuse_commits = None
    assert hub_in_process.repos["someone/refused"]["visibility"] == "private"
    assert line.startswith("error: could not push release 'dm' to someone/refused")
    assert "uploading the files failed" in line and "401" in line


def test_an_unreachable_hub_is_one_error_line(monkeypatch, capsys):
    with socket.socket() as unused:  # a port that nothing listens on once this closes
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    use_endpoint(monkeypatch, endpoint)
    line = error_line(["push", RELEASE, "--repo-id", REPO], capsys)
    assert line.startswith(f"error: could not push release 'dm' to {REPO} on {endpoint}")
    assert "creating the repository failed" in line
