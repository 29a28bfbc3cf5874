# Unit tests of the p2p layer's sans-IO parts: identity files, envelopes, replay guard,
# frames, membership view and peer scores.
import os
import stat

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.envelope import EnvelopeError, ReplayGuard, open_envelope, seal
from p2p.framing import FrameError, decode_body, encode_frame, frame_length
from p2p.identity import Identity, IdentityError, load_or_create_identity, peer_id_from_public_key
from p2p.membership import MembershipConfig, MemberState, MemberView
from p2p.scoring import PeerScores

NET = "unit-net"


def test_key_file_is_private_and_stable(tmp_path):
    first = load_or_create_identity(tmp_path)
    mode = stat.S_IMODE((tmp_path / "node.key").stat().st_mode)
    assert mode == 0o600
    assert load_or_create_identity(tmp_path).peer_id == first.peer_id
    assert peer_id_from_public_key(first.public_key) == first.peer_id


@pytest.mark.parametrize(
    "content",
    ["", "garbage\n", "tasknet-ed25519-seed-v1\nzz\n", "tasknet-ed25519-seed-v1\n" + "ab" * 31],
)
def test_corrupt_key_file_is_an_error_not_replaced(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)
    assert path.read_text() == content


def test_world_readable_key_file_is_refused(tmp_path):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / "node.key", 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_envelope_round_trip_names_author():
    ident = Identity.generate()
    data = seal(ident, NET, "t", 7, {"x": [1, 2]})
    env = open_envelope(data, network=NET, channel="t", max_size=1 << 20)
    assert (env.author, env.seq, env.payload) == (ident.public_key, 7, {"x": [1, 2]})


def _reason(data, network=NET, channel="t", max_size=1 << 20):
    with pytest.raises(EnvelopeError) as info:
        open_envelope(data, network=network, channel=channel, max_size=max_size)
    return info.value.reason


def test_envelope_refusals():
    ident = Identity.generate()
    good = seal(ident, NET, "t", 1, "payload")
    version, body, sig = msgpack.unpackb(good)
    assert _reason(good, network="other") == "network"
    assert _reason(good, channel="u") == "channel"
    assert _reason(good, max_size=10) == "oversized"
    assert _reason(good[:-5]) == "malformed"
    assert _reason(msgpack.packb([2, body, sig])) == "version"
    assert _reason(msgpack.packb([version, body, b""])) == "unsigned"
    forged_body = body.replace(b"payload", b"PAYLOAD")
    assert _reason(msgpack.packb([version, forged_body, sig])) == "forged"
    other = Identity.generate()
    assert _reason(msgpack.packb([version, body, other.sign(body)])) == "forged"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_open(data):
    with pytest.raises(EnvelopeError):
        open_envelope(data, network=NET, channel="t", max_size=1 << 20)


def test_replay_guard_accepts_each_sequence_once():
    guard = ReplayGuard(window=8)
    author = b"a" * 32
    for seq in (5, 3, 9, 4):
        guard.check_and_record(author, seq)
    for seq in (5, 3, 9):
        with pytest.raises(EnvelopeError, match="already seen"):
            guard.check_and_record(author, seq)
    with pytest.raises(EnvelopeError, match="older than"):
        guard.check_and_record(author, 1)
    guard.check_and_record(author, 8)
    guard.check_and_record(b"b" * 32, 5)
    guard.check_and_record(author, 10**30)  # a far jump resets the window, cheaply
    with pytest.raises(EnvelopeError):
        guard.check_and_record(author, 10**30)


def test_frames_round_trip_and_limits():
    frame = encode_frame({"k": b"v" * 10}, max_size=100)
    assert frame_length(frame[:4], 100) == len(frame) - 4
    assert decode_body(frame[4:], 100) == {"k": b"v" * 10}
    with pytest.raises(FrameError):
        encode_frame(b"x" * 200, max_size=100)
    with pytest.raises(FrameError):
        frame_length((10_000).to_bytes(4, "big"), 100)
    with pytest.raises(FrameError):
        frame_length(b"\x00\x01", 100)
    with pytest.raises(FrameError):
        decode_body(b"\xc1\xc1", 100)


def test_membership_lifecycle():
    view = MemberView("me", MembershipConfig(suspect_after=3, dead_after=6, forget_after=20))
    events = view.observe_heartbeat("p", ("/ip4/127.0.0.1/tcp/1",), 1, now=0)
    assert [(e.previous, e.current) for e in events] == [(None, MemberState.ALIVE)]
    assert view.observe_heartbeat("p", ("a",), 1, now=1) == []
    assert view.tick(now=4.5)[0].current is MemberState.SUSPECT
    assert view.tick(now=7.5)[0].current is MemberState.DEAD
    back = view.observe_heartbeat("p", ("a",), 2, now=8)
    assert back[0].current is MemberState.ALIVE and back[0].restarted
    assert view.observe_heartbeat("p", ("a",), 1, now=9) == []  # stale incarnation
    assert view.get("p").incarnation == 2
    stopped = view.observe_leave("p", 2, now=10)
    assert stopped[0].current is MemberState.DEAD and not stopped[0].member.left
    assert view.observe_heartbeat("p", ("a",), 3, now=10.5)[0].current is MemberState.ALIVE
    assert view.observe_leave("p", 3, now=11, permanent=True)[0].member.left
    assert view.tick(now=40)[0].current is None
    assert view.members() == []


def test_scores_ban_and_recover():
    scores = PeerScores(ban_below=-100, half_life_s=10, ban_seconds=30)
    banned = [scores.penalize("x", "forged", now=0) for _ in range(3)]
    assert banned == [False, False, True]
    assert scores.is_banned("x", now=1)
    assert not scores.is_banned("x", now=31)
    scores.penalize("y", "malformed", now=0)
    assert -10 < scores.score("y", now=10) < -4  # decays with the half-life


def test_scores_of_peers_met_once_are_forgotten_once_decayed():
    # every peer that offended once kept its score for the life of the process: a fresh
    # identity per connection, each scored down once, grew the table without bound
    scores = PeerScores(half_life_s=10)
    for i in range(20_000):  # one offence each, 20 per simulated second
        scores.penalize(f"sybil-{i}", "malformed", now=i / 20)
    # a -10 decays below -1 in about 3.3 half-lives: only the last ~35 s are held
    assert len(scores.snapshot(now=1000)) <= 2 * 35 * 20 + 1024
    assert scores.score("sybil-0", now=1000) == 0.0
    assert scores.score("sybil-19999", now=999.95) == -10.0  # recent ones still count


def test_scores_beyond_the_cap_forget_the_mildest_first():
    scores = PeerScores(max_peers=100)
    for _ in range(10):  # on the ban line, not past it
        scores.penalize("near-ban", "malformed", now=0)
    for _ in range(2):
        scores.penalize("banned", "forged", now=0)
    assert scores.penalize("banned", "forged", now=0)
    for i in range(5000):  # all at once: nothing has decayed yet
        scores.penalize(f"sybil-{i}", "replayed", now=0)
    assert len(scores.snapshot(now=0)) <= 100
    assert scores.is_banned("banned", now=1)
    assert scores.penalize("near-ban", "malformed", now=1)  # its score was kept


def test_failure_detection_scales_with_the_members_heartbeat_interval():
    view = MemberView("me", MembershipConfig(suspect_after=3, dead_after=8))
    view.observe_heartbeat("fast", ("a",), 1, now=0, interval=1.0)
    view.observe_heartbeat("slow", ("b",), 1, now=0, interval=5.0)  # a big network's pace
    suspects = {e.peer_id for e in view.tick(now=4) if e.current is MemberState.SUSPECT}
    assert suspects == {"fast"}
    assert {e.peer_id for e in view.tick(now=16)} == {"fast", "slow"}
    assert view.get("slow").state is MemberState.SUSPECT  # dead only after 8 intervals
    assert view.tick(now=41)[0].current is MemberState.DEAD
