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


def test_command_stream_delivers_what_the_command_wrote_before_it_failed(tmp_path):
    """A command that wrote part of a shard and exited non-zero *before the first read* (a download cut while
    the pipe still held its bytes): every byte it wrote is read, then the failure is raised at the end of the
    output, named with curl's meaning of the status; read_shard reports the samples it got and where the shard
    broke off. webdataset's Pipe raised on the first read here, as if the shard could not be read at all."""
    from tldist.data.retry import CommandStream
    from tldist.data.stream import read_shard

    m = make_shard_set(tmp_path / "s", split="train", n=20, shards=1)
    path = tmp_path / "s" / m.shards[0].name
    half = path.stat().st_size // 2
    stream = CommandStream(f"head -c {half} {path}; exit 18", name="curl", shell=True)
    stream._proc.wait()  # the command has ended before anything is read
    assert stream.read(1000) == path.read_bytes()[:1000]
    rest = stream.read(half)
    while len(rest) < half - 1000:
        more = stream.read(half)
        assert more, "the end came before every byte the command wrote"
        rest += more
    assert rest == path.read_bytes()[1000:half]
    with pytest.raises(OSError, match=r"^curl exited with status 18: the transfer ended early"):
        stream.read(10)
    assert stream.failure.startswith("curl exited with status 18")
    with pytest.raises(OSError, match="status 18"):
        stream.close()
    stream.close()  # a second close does nothing

    local = [r.fields for r in read_shard(str(path), 0, 20)]
    from tldist.data.retry import RetryPolicy
    recs = list(read_shard(f"pipe:head -c {half} {path}; exit 3", 2, 18, policy=RetryPolicy(retries=0)))
    good = [r for r in recs if r.ok]  # the last may be a sample cut mid-way (its members read before the cut)
    assert len(recs) == 18 and 1 < len(good) < 18 and [r.fields for r in good[:-1]] == local[2:1 + len(good)]
    cut = tmp_path / "cut.tar"  # the same bytes as a local file: every sample they hold is delivered
    cut.write_bytes(path.read_bytes()[:half])
    assert len(good) == sum(r.ok for r in read_shard(str(cut), 2, 18))
    errors = {r.error for r in recs if not r.ok}
    assert len(errors) == 1 and errors.pop() in {
        f"the shard broke off after {n} samples ('{cmd[:80]}' exited with status 3)"
        for cmd in [f"head -c {half} {path}; exit 3"] for n in (1 + len(good), 2 + len(good))}


def test_command_stream_closed_early_is_not_a_failure():
    """A reader that stops before the end (a resume that needs only part of a shard) closes the command's
    output: the SIGPIPE or curl's write error that stops the command is not reported as a failure; a
    command that failed on its own is, from close()."""
    from tldist.data.retry import CommandStream

    stream = CommandStream("yes", name="'yes'", shell=True)
    assert stream.read(4) == b"y\ny\n"
    stream.close()
    assert stream.failure is None and stream.closed
    stream = CommandStream(["sh", "-c", "printf abc; exit 7"], name="curl")
    assert stream.read(3) == b"abc"
    stream._proc.wait()
    with pytest.raises(OSError, match="curl exited with status 7: could not connect to the host"):
        stream.close()
