"""``lsm-ros weights fetch`` against a loopback HTTP server (no internet): download, resume with HTTP Range,
servers without Range, size and hash verification, HTTP errors, timeouts; the CLI's exit codes and messages; the
bounded-number argparse types."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from lsm_ros import cli
from lsm_ros.weights import (OFFICIAL_WEIGHTS, PART_SUFFIX, WEIGHTS_ENV, FetchResult, WeightsError, WeightsFile,
                             default_weights_dir, fetch_file, fetch_weights)

PAYLOAD = bytes(range(256)) * 1200 + b'tail'      # 307 204 bytes of synthetic "weights"
OTHER = b'x' * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
TIMEOUT = 0.3


@dataclass
class ServerState:
    """What the loopback server serves and how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)     # answer 200 with everything, whatever the Range
    cut_after: dict[str, int] = field(default_factory=dict)  # close the connection after N body bytes (once)
    stall_after: dict[str, int] = field(default_factory=dict)  # send N body bytes, then nothing (once)
    redirect: dict[str, dict[str, str]] = field(default_factory=dict)  # 302 to /blob/<name> with these headers
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class Handler(http.server.BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: ServerState = self.server.state
        state.requests.append((self.path, self.headers.get('Range')))
        path = urllib.parse.unquote(self.path.lstrip('/'))
        name = path.removeprefix('blob/')
        if name in state.redirect and not path.startswith('blob/'):
            self.send_response(302)
            self.send_header('Location', '/blob/' + urllib.parse.quote(name))
            for key, value in state.redirect[name].items():
                self.send_header(key, value)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        data = state.files.get(name)
        if data is None:
            self.send_error(404, 'Not Found')
            return
        start = 0
        match = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        if match and name not in state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if name in state.cut_after:
            self.wfile.write(body[:state.cut_after.pop(name)])
            return  # HTTP/1.0: the connection closes here, short of Content-Length
        if name in state.stall_after:
            self.wfile.write(body[:state.stall_after.pop(name)])
            self.wfile.flush()
            state.release.wait(5)
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the system), serving ServerState.files."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}', httpd.state
    finally:
        httpd.state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def entry(base: str, name: str = 'weights.pth', *, size: int | None = len(PAYLOAD),
          sha256: str | None = SHA) -> WeightsFile:
    return WeightsFile(key='dust3r', filename=name, label='DUSt3R', url=f'{base}/{name}', source='test server',
                       size=size, sha256=sha256)


def fetch(item: WeightsFile, directory: Path, **kwargs: Any) -> FetchResult:
    return fetch_file(item, directory, timeout=TIMEOUT, progress=False, **kwargs)


def fetch_broken_once(server: tuple[str, ServerState], directory: Path, match: str, **fault: int) -> None:
    """Serve PAYLOAD as weights.pth, broken once as ``fault`` says (``cut_after=N`` or ``stall_after=N``: see
    ServerState), and check that a fetch into ``directory`` fails with ``match``."""
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    for how, after in fault.items():
        getattr(state, how)['weights.pth'] = after
    with pytest.raises(WeightsError, match=match):
        fetch(entry(base), directory)


# ------------------------------------------------------------------------------------------------ downloads
def test_download_verifies_and_installs_atomically(server, tmp_path) -> None:
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    result = fetch(entry(base), tmp_path / 'cache')
    target = tmp_path / 'cache' / 'weights.pth'
    assert result.status == 'downloaded' and result.verification == 'published-sha256' and result.verified
    assert result.path == target and target.read_bytes() == PAYLOAD and result.sha256 == SHA
    assert not (tmp_path / 'cache' / f'weights.pth{PART_SUFFIX}').exists()
    assert 'verified against the published hash' in result.describe()
    # a second run verifies the installed file and downloads nothing
    again = fetch(entry(base), tmp_path / 'cache')
    assert again.status == 'present' and again.verified and len(state.requests) == 1
    # an installed file that does not match the published hash is reported, not silently kept
    target.write_bytes(OTHER)
    with pytest.raises(WeightsError, match='not the published.*--force'):
        fetch(entry(base, size=None), tmp_path / 'cache')
    assert fetch(entry(base), tmp_path / 'cache', force=True).status == 'downloaded'
    assert target.read_bytes() == PAYLOAD


def test_interrupted_transfer_resumes_with_range(server, tmp_path) -> None:
    base, state = server
    fetch_broken_once(server, tmp_path, r'interrupted after 100000 of 307204 bytes.*again to resume', cut_after=100_000)
    part = tmp_path / f'weights.pth{PART_SUFFIX}'
    assert part.read_bytes() == PAYLOAD[:100_000] and not (tmp_path / 'weights.pth').exists()
    result = fetch(entry(base), tmp_path)
    assert state.requests[-1] == ('/weights.pth', 'bytes=100000-')  # asked for the remaining range only
    assert result.received == len(PAYLOAD) - 100_000 and result.size == len(PAYLOAD)
    assert result.sha256 == SHA and (tmp_path / 'weights.pth').read_bytes() == PAYLOAD and not part.exists()
    assert 'resumed' in result.describe()


def test_server_without_range_support_restarts_from_zero(server, tmp_path) -> None:
    base, state = server
    state.ignore_range.add('weights.pth')
    fetch_broken_once(server, tmp_path, 'interrupted', cut_after=5000)
    result = fetch(entry(base), tmp_path)
    assert state.requests[-1][1] == 'bytes=5000-'                   # it asked to resume ...
    assert result.received == len(PAYLOAD) and result.verified       # ... got everything again, not appended
    assert (tmp_path / 'weights.pth').read_bytes() == PAYLOAD


def test_complete_partial_file_is_installed_on_416(server, tmp_path) -> None:
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    (tmp_path / f'weights.pth{PART_SUFFIX}').write_bytes(PAYLOAD)
    result = fetch(entry(base), tmp_path)
    assert result.received == 0 and result.verified and (tmp_path / 'weights.pth').read_bytes() == PAYLOAD


@pytest.mark.parametrize('size, sha256, message', [
    (len(PAYLOAD) + 1, SHA, r'wrong size: 307204 bytes .* published size is 307205'),
    (len(PAYLOAD), hashlib.sha256(OTHER).hexdigest(), r'wrong SHA-256: ' + SHA),
])
def test_wrong_size_or_hash_installs_nothing(server, tmp_path, size, sha256, message) -> None:
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    with pytest.raises(WeightsError, match=message + '.*nothing was installed under the final name'):
        fetch(entry(base, size=size, sha256=sha256), tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the bad download


def test_http_error_says_how_to_retry(server, tmp_path) -> None:
    base, _ = server
    with pytest.raises(WeightsError, match=r'HTTP 404 Not Found from http://127\.0\.0\.1:\d+/weights\.pth; '
                                           r'nothing was installed\. run `lsm-ros weights fetch` again'):
        fetch(entry(base), tmp_path)
    assert not (tmp_path / 'weights.pth').exists()


def test_slow_server_times_out_and_keeps_the_partial_file(server, tmp_path) -> None:
    base, _ = server
    fetch_broken_once(server, tmp_path, r'no answer within 0\.3 s \(--timeout\).*again to resume', stall_after=2000)
    assert (tmp_path / f'weights.pth{PART_SUFFIX}').stat().st_size == 2000
    assert fetch(entry(base), tmp_path).sha256 == SHA


def test_hash_announced_by_the_server_is_checked(server, tmp_path) -> None:
    """Hugging Face announces an LFS file's SHA-256 and size on the redirect of its resolve address."""
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    state.redirect['weights.pth'] = {'X-Linked-Etag': f'"{SHA}"', 'X-Linked-Size': str(len(PAYLOAD))}
    result = fetch(entry(base, size=None, sha256=None), tmp_path / 'a')
    assert result.verification == 'server-sha256' and 'hash the server announced' in result.describe()
    assert [path for path, _ in state.requests] == ['/weights.pth', '/blob/weights.pth']
    state.redirect['weights.pth'] = {'X-Linked-Etag': hashlib.sha256(OTHER).hexdigest()}
    with pytest.raises(WeightsError, match='the SHA-256 the server announced'):
        fetch(entry(base, size=None, sha256=None), tmp_path / 'b')
    assert not (tmp_path / 'b' / 'weights.pth').exists()


def test_unverifiable_file_says_so_and_prints_its_hash(server, tmp_path) -> None:
    base, state = server
    state.files['weights.pth'] = PAYLOAD
    result = fetch(entry(base, size=None, sha256=None), tmp_path)
    assert result.verification == 'unverified' and not result.verified
    assert f'NOT verified: no SHA-256 is published for weights.pth. SHA-256 of the local copy: {SHA}' \
        in result.describe()


def test_one_failure_does_not_stop_the_others_and_base_url(server, tmp_path) -> None:
    base, state = server
    state.files['a.pth'] = PAYLOAD
    files = [entry('http://unused.invalid', 'a.pth'),
             WeightsFile(key='lseg', filename='b.ckpt', label='LSeg', url='http://unused.invalid/b.ckpt',
                         source='test')]
    outcomes = fetch_weights(tmp_path, files=files, base_url=base + '/', timeout=TIMEOUT, progress=False)
    assert [outcome.ok for outcome in outcomes] == [True, False] and 'HTTP 404' in outcomes[1].error
    assert [path for path, _ in state.requests] == ['/a.pth', '/b.ckpt']
    only = fetch_weights(tmp_path, files=files, only=['lseg'], base_url=base, timeout=TIMEOUT, progress=False)
    assert [outcome.entry.key for outcome in only] == ['lseg']
    with pytest.raises(WeightsError, match='unknown weight file'):
        fetch_weights(tmp_path, files=files, only=['nope'])
    with pytest.raises(WeightsError, match='only http'):
        fetch_file(files[0], tmp_path / 'x', base_url='file:///etc')


def test_google_drive_file_gets_manual_instructions(tmp_path) -> None:
    """LSeg's file is on Google Drive only: no request is made, the message says what to do."""
    (outcome,) = fetch_weights(tmp_path, only=['lseg'], progress=False)
    assert not outcome.ok
    assert 'drive.google.com/file/d/1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7' in outcome.error
    assert f'gdown 1FTuHY1xPUkM-5gaDtMfgCl3D0gR89WV7 -O {tmp_path / "demo_e200.ckpt"}' in outcome.error
    assert f'lsm-ros weights check --dir {tmp_path}' in outcome.error and '--base-url' in outcome.error


def test_registry_and_default_folder(monkeypatch, tmp_path) -> None:
    names = {e.key: e.filename for e in OFFICIAL_WEIGHTS}
    assert names == {'dust3r': 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth', 'lseg': 'demo_e200.ckpt',
                     'lsm': 'checkpoint-final.pth'}
    assert all(e.url is None or e.url.startswith('https://') for e in OFFICIAL_WEIGHTS)
    assert all(e.source for e in OFFICIAL_WEIGHTS)
    with pytest.raises(ValueError, match='64 lower-case hex'):
        WeightsFile(key='x', filename='x', label='x', url=None, source='x', sha256='ABC')
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / 'w'))
    assert default_weights_dir() == tmp_path / 'w'
    monkeypatch.delenv(WEIGHTS_ENV)
    assert default_weights_dir() == Path.home() / '.cache' / 'lsm_ros' / 'weights'


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_fetch_exit_codes_and_messages(server, tmp_path, capsys, monkeypatch) -> None:
    base, state = server
    state.files['DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth'] = PAYLOAD
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / 'cache'))  # the default folder
    code = cli.main(['weights', 'fetch', '--only', 'dust3r', '--base-url', base, '--no-progress'])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / 'cache' / 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth').read_bytes() == PAYLOAD
    assert f'NOT verified: no SHA-256 is published for DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth. SHA-256 of the ' \
           f'local copy: {SHA}' in out
    code = cli.main(['weights', 'fetch', '--dir', str(tmp_path / 'other'), '--only', 'lsm', '--only', 'dust3r',
                     '--base-url', base, '--timeout', '0.5', '--no-progress'])
    captured = capsys.readouterr()
    assert code == 1 and 'checkpoint-final.pth: HTTP 404' in captured.err
    assert '1 of 2 file(s) not installed: checkpoint-final.pth' in captured.err
    assert [path for path, _ in state.requests] == ['/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth'] * 2 + \
        ['/checkpoint-final.pth']  # registry order, and only the loopback server was asked
    assert cli.main(['weights', 'fetch', '--dir', str(tmp_path), '--only', 'lseg']) == 1
    err = capsys.readouterr().err
    assert 'demo_e200.ckpt (LSeg) has no direct download address' in err and 'drive.google.com' in err


@pytest.mark.parametrize('argv', [['--timeout', '0'], ['--timeout', 'soon'], ['--only', 'clip']])
def test_cli_fetch_refuses_bad_options(argv, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(['weights', 'fetch', '--dir', str(tmp_path), *argv])
    assert exit_info.value.code == 2 and 'error' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ argparse types
@pytest.mark.parametrize('parse, text, value', [
    (cli.positive_int, '3', 3), (cli.non_negative_int, '0', 0), (cli.positive_float, '0.25', 0.25),
    (cli.probability, '1', 1.0), (cli.probability, '0', 0.0)])
def test_bounded_numbers_accept(parse, text, value) -> None:
    assert parse(text) == value and type(parse(text)) is type(value)


@pytest.mark.parametrize('parse, text, message', [
    (cli.positive_int, 'x', "'x' is not an integer"), (cli.positive_int, '1.5', "'1.5' is not an integer"),
    (cli.positive_int, '0', '0 is not a positive integer'), (cli.non_negative_int, '-1', '-1 is negative'),
    (cli.non_negative_int, 'one', "'one' is not an integer"), (cli.positive_float, '0', '0 is not a positive number'),
    (cli.positive_float, 'inf', 'inf is not a positive number'), (cli.positive_float, 'nan', 'nan is not a positive '
                                                                                             'number'),
    (cli.positive_float, '-2', '-2 is not a positive number'), (cli.positive_float, 'a', "'a' is not a number"),
    (cli.probability, '1.5', '1.5 is not a probability in [0, 1]'), (cli.probability, 'nan', 'nan is not a '
                                                                                              'probability in [0, 1]')])
def test_bounded_numbers_refuse_with_the_same_messages(parse, text, message) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(text)
    assert str(error.value) == message


def test_bounded_numbers_are_one_factory() -> None:
    names = {parse.__name__ for parse in (cli.positive_int, cli.non_negative_int, cli.positive_float, cli.probability)}
    assert names == {'positive_int', 'non_negative_int', 'positive_float', 'probability'}
    assert {parse.__code__ for parse in (cli.positive_int, cli.non_negative_int, cli.positive_float)} == \
        {cli.bounded_number(int, minimum=0, not_a_number='', out_of_range='', name='', doc='').__code__}
