"""One rule for secret keys and URL credentials (keel.tracking.secrets), applied to configs, Hydra's
``.hydra/`` files and ``keel submit``'s runtime_env."""

from __future__ import annotations

import json

import pytest
from keel.tracking.logger import redact
from keel.tracking.secrets import REDACTED, is_secret_key, redact_text

SECRET_KEYS = ["api_key", "api-key", "apikey", "apiKey", "API_KEY", "WANDB_API_KEY", "token", "hf_token", "HF_TOKEN",
               "access_token", "refreshToken", "use_auth_token", "password", "passwd", "db_password",
               "Authorization", "authorization", "credentials", "aws_credentials", "aws_secret_access_key",
               "client_secret", "SECRET", "private_key", "ssh_keys", "session_cookie", "passphrase",
               "RAY_AUTH_TOKEN"]
PLAIN_KEYS = ["max_new_tokens", "min_trained_tokens", "tokens", "num_tokens", "step_source_tokens",
              "supervised_tokens", "tokens_per_s", "tokenizer", "tokenizer_path", "pad_token", "eos_token",
              "bos_token_id", "pad_token_id", "token_count", "key", "keys", "monkey", "keyword", "path", "project",
              "trust_remote_code", "checker", "hydra", "HOME", "PWD", "max_len", "RAY_AUTH_MODE"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_redacted(key):
    assert is_secret_key(key)
    assert redact({key: "s3cr3t-value"}) == {key: REDACTED}


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys_are_kept(key):
    assert not is_secret_key(key)
    assert redact({key: 32}) == {key: 32} and redact({key: "x"}) == {key: "x"}


@pytest.mark.parametrize(("text", "expected"), [
    ("https://user:pa55@example.com/data.jsonl", "https://<redacted>@example.com/data.jsonl"),
    ("s3://AKIAXXX:abc%2Fdef@bucket/key", "s3://<redacted>@bucket/key"),
    ("git+https://ghp_abcdef@github.com/org/repo.git", "git+https://<redacted>@github.com/org/repo.git"),
    ("https://example.com/data?token=abc123&split=train", "https://example.com/data?token=<redacted>&split=train"),
    ("https://example.com/a@b", "https://example.com/a@b"),  # an @ in the path is no credential
    ("postgresql://keel:hunter2@db:5432/runs", "postgresql://<redacted>@db:5432/runs"),
    ("logger.api_key=abc", "logger.api_key=<redacted>"),
    ("+model.hf_token=hf_x,trainer.max_steps=5", "+model.hf_token=<redacted>,trainer.max_steps=5"),
    ("eval.passk.max_new_tokens=64", "eval.passk.max_new_tokens=64"),
    ("Authorization: Bearer abc.def", "Authorization: <redacted>"),
    ("curl -H 'Bearer xyz123'", "curl -H 'Bearer <redacted>'"),
    ("plain text with a basic idea", "plain text with a basic idea"),
])
def test_secrets_in_strings_lose_only_the_secret(text, expected):
    assert redact_text(text, []) == expected


def test_environment_secret_values_are_replaced_where_they_occur(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    monkeypatch.setenv("PWD", "/work/somewhere")  # not a secret name: its value stays
    out = redact({"note": "uses tok-0123456789 here", "dir": "/work/somewhere", "n": [1, None]})
    assert out == {"note": "uses <redacted> here", "dir": "/work/somewhere", "n": [1, None]}
    assert "tok-0123456789" not in json.dumps(redact({"deep": [{"x": "a tok-0123456789"}]}))


def test_empty_secret_values_stay_visible():
    assert redact({"api_key": None, "token": ""}) == {"api_key": None, "token": ""}  # nothing to hide


def test_hydra_record_is_written_redacted(tmp_path):
    """Hydra would write .hydra/{config,hydra,overrides}.yaml in clear before the job even starts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    keel = Path(sys.executable).with_name("keel")
    run = tmp_path / "run"
    env = {**os.environ, "HF_TOKEN": "hf_env_only_value_42"}
    out = subprocess.run([str(keel), "train", f"hydra.run.dir={run}", "model.path='https://u:hunter2@host/m'",
                          "eval.passk.data='https://h/x.jsonl?api_key=k3y-zz9'", "logger.project=hf_env_only_value_42",
                          "mix.T=-1"],  # fails validation: the record is written before it
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0 and "mix.T" in out.stderr
    files = {p.name: p.read_text() for p in (run / ".hydra").iterdir()}
    assert set(files) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    for secret in ("hunter2", "k3y-zz9", "hf_env_only_value_42"):
        assert not [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    # Everything else is kept for reproducibility: the overrides, with only the secrets replaced.
    assert "- model.path='https://<redacted>@host/m'" in files["overrides.yaml"] and "- mix.T=-1" in files[
        "overrides.yaml"]
    assert "api_key=<redacted>" in files["config.yaml"] and "override_dirname: " in files["hydra.yaml"]


# ------------------------------------------------------------------------------- keel submit


class FakeJobClient:
    """Records what would be submitted to a Ray job server."""

    def __init__(self) -> None:
        self.submitted: dict = {}

    def submit_job(self, **kwargs) -> None:
        self.submitted = kwargs

    def get_address(self) -> str:
        return "http://fake:8265"

    def get_job_status(self, job_id: str):
        class Status:
            value = "PENDING"
        return Status()


def test_submit_sends_secret_files_by_path_only(monkeypatch, tmp_path):
    from keel.cli import submit as cli
    from keel.launch import submit as jobs

    fake = FakeJobClient()
    monkeypatch.setattr(jobs, "client", lambda address=None: fake)
    with pytest.raises(SystemExit) as done:
        cli.main(["--no-wait", "--no-working-dir", "--run-dir", str(tmp_path / "run"),
                  "--secret-file", "WANDB_API_KEY=/shared/me/.wandb_key", "trainer.max_steps=2"])
    assert done.value.code == 0
    env_vars = fake.submitted["runtime_env"]["env_vars"]
    assert json.loads(env_vars["KEEL_SECRET_FILES"]) == {"WANDB_API_KEY": "/shared/me/.wandb_key"}
    assert "WANDB_API_KEY" not in env_vars
    with pytest.raises(ValueError, match="must be absolute"):
        jobs.runtime_env(None, None, {"HF_TOKEN": "secrets/hf"})  # would be uploaded with the working dir


def test_submit_warns_about_secrets_passed_by_value(monkeypatch, tmp_path, capsys):
    from keel.launch import submit as jobs

    monkeypatch.setattr(jobs, "client", lambda address=None: FakeJobClient())
    jobs.submit([], None, run_dir=str(tmp_path), working_dir=None, wait=False,
                env={"HF_TOKEN": "hf_x", "WANDB_PROJECT": "keel"})
    err = capsys.readouterr().err
    assert "--env HF_TOKEN=... puts a secret into the job's runtime_env in clear" in err
    assert "--secret-file HF_TOKEN=" in err and "WANDB_PROJECT" not in err


def test_job_reads_secret_files_on_the_node_and_redacts_them(monkeypatch, tmp_path):
    from keel.tracking.secrets import load_secret_files

    key_file = tmp_path / "key"
    key_file.write_text("s3cr3t-from-file\n")
    monkeypatch.delenv("MY_SERVICE", raising=False)
    monkeypatch.setenv("KEEL_SECRET_FILES", json.dumps({"MY_SERVICE": str(key_file)}))
    assert load_secret_files() == ["MY_SERVICE"]
    import os

    assert os.environ["MY_SERVICE"] == "s3cr3t-from-file"
    # A secret given by file is a secret whatever its name.
    assert redact({"note": "x s3cr3t-from-file"}) == {"note": "x <redacted>"}
    monkeypatch.setenv("KEEL_SECRET_FILES", json.dumps({"MY_SERVICE": str(tmp_path / "missing")}))
    with pytest.raises(ValueError, match=r"MY_SERVICE .*missing"):
        load_secret_files()
