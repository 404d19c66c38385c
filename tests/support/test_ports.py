"""The test servers' ports come from below the kernel's ephemeral range, a band per xdist worker, never twice."""

import socket

import pytest

from support import ports


def test_ports_are_free_distinct_and_outside_the_ephemeral_range():
    picked = ports.free_ports(9)
    assert len(set(picked)) == 9
    band = ports.band()
    if band:  # the usual Linux range leaves room below it
        assert all(p in band and p < ports._ephemeral_low() for p in picked)
    for p in picked:
        with socket.socket() as s:
            s.bind(("", p))  # each is bindable on every interface, as Ray binds some of them


def test_a_port_is_never_handed_out_twice_even_when_its_server_has_not_bound_it_yet():
    first, second = ports.free_ports(20), ports.free_ports(20)
    assert not set(first) & set(second)


def test_a_port_in_use_is_skipped(monkeypatch):
    (p,) = ports.free_ports(1)
    band = ports.band()
    if not band:
        pytest.skip("this machine's ephemeral port range leaves no band below it")
    ports._handed.discard(p)  # as if another process had picked it, and its server bound it
    monkeypatch.setattr(ports.random, "randrange", lambda n: band.index(p))  # the scan starts at it
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))
        s.listen()
        (q,) = ports.free_ports(1)
    assert q != p and q in band


def test_each_xdist_worker_has_a_band_of_its_own():
    bands = [ports.band(f"gw{i}") for i in range(ports.BANDS)]
    if not bands[0]:
        pytest.skip("this machine's ephemeral port range leaves no band below it")
    assert all(a.stop <= b.start for a, b in zip(bands, bands[1:]))
    assert ports.band("gw0") == ports.band("not-xdist") and bands[0].start >= ports.LOW
