import pytest

from localcoder.config import load_config
from localcoder.errors import InvalidRequest


def test_precedence_defaults_file_env_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 9000\nhost = "127.0.0.2"\n[completion]\nmax_tokens = 32\n')
    cfg = load_config(f, env={"LOCALCODER_PORT": "9100"}, overrides={"max_tokens": 16})
    assert cfg.server.port == 9100  # env beats file
    assert cfg.server.host == "127.0.0.2"  # file beats default
    assert cfg.completion.max_tokens == 16  # CLI beats everything
    assert load_config(env={}).server.host == "127.0.0.1"


@pytest.mark.parametrize("text,param", [
    ("[server]\nport = 'x'\n", "port"),
    ("[server]\nprot = 1\n", "prot"),
    ("[nope]\na = 1\n", "nope"),
    ("[server\n", "config"),
])
def test_bad_config_files_name_the_setting(tmp_path, text, param):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(InvalidRequest) as err:
        load_config(f, env={})
    assert err.value.param == param


def test_env_booleans_and_missing_explicit_file(tmp_path):
    assert load_config(env={"LOCALCODER_INSECURE_NO_AUTH": "yes"}).server.insecure_no_auth is True
    with pytest.raises(InvalidRequest):
        load_config(env={"LOCALCODER_INSECURE_NO_AUTH": "maybe"})
    with pytest.raises(InvalidRequest, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
