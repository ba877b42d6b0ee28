"""tldist.data.retry: the retry policy of remote shard reads, and which reads it covers.

The retries themselves run against real servers and commands in ``tests/e2e/test_foreign_data.py`` (a TCP proxy
that drops a connection mid-shard, over HTTP, ``pipe:`` and S3)."""

from __future__ import annotations

import pytest

from helpers import make_shard_set


def test_policy_backoff_and_config_keys():
    from tldist.config import DataConfig
    from tldist.data.retry import RetryPolicy
    from tldist.errors import ConfigError

    p = RetryPolicy.from_config(DataConfig(read_retries=4, retry_backoff_s=0.25))
    assert (p.retries, [p.delay(k) for k in (1, 2, 3, 4)]) == (4, [0.25, 0.5, 1.0, 2.0])
    assert RetryPolicy.from_config(DataConfig()) == RetryPolicy()  # the config's defaults are the policy's
    with pytest.raises(ConfigError, match="data.read_retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ConfigError, match="data.retry_backoff_s"):
        RetryPolicy(backoff_s=float("nan"))


def test_only_remote_shards_are_retried(tmp_path):
    """A local shard cut short is not re-opened (the missing samples are failed records at once), nor is a
    pipe: command that fails before it delivered anything (that is left to the command's own retries)."""
    from tldist.data.retry import RetryPolicy, configure, current_policy, is_remote, retry_count
    from tldist.data.stream import read_shard

    assert [is_remote(u) for u in ("http://h/x.tar", "https://h/x.tar", "pipe:cat x.tar", "s3://b/x.tar",
                                   "/data/x.tar", "x.tar")] == [True, True, True, True, False, False]
    m = make_shard_set(tmp_path / "s", split="train", n=20, shards=1)
    path = tmp_path / "s" / m.shards[0].name
    path.write_bytes(path.read_bytes()[:9000])  # truncated mid-member
    old = current_policy()
    configure(RetryPolicy(retries=5, backoff_s=0))
    try:
        before = retry_count()
        recs = list(read_shard(str(path), 0, 20))
        assert len(recs) == 20 and not recs[-1].ok and "broke off after" in recs[-1].error
        failed = list(read_shard("pipe:exit 3", 0, 2))
        assert [r.error for r in failed] == ["the shard cannot be read ('exit 3' exited with status 3)"] * 2
        assert retry_count() == before
    finally:
        configure(old)
