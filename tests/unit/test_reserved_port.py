"""rollout/vllm_weight_transfer.py reserved_port: the port the GPU weight-transfer group's
rendezvous uses is held from its choice until vLLM's store listens on it. Real sockets and
vLLM's own StatelessProcessGroup (a TCPStore: it runs on CPU)."""
import errno
import socket

import pytest

from rollout.vllm_weight_transfer import reserved_port


def node_addresses() -> list[str]:
    import ray

    return sorted({"127.0.0.1", ray.util.get_node_ip_address()})


def plain_bind_listen(port: int) -> int:
    """The errno of a bind+listen of `port` on all interfaces (0: it got the port)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
            s.listen()
        except OSError as e:
            return e.errno
        return 0


@pytest.mark.parametrize("host", node_addresses())
def test_vllm_binds_the_reserved_port_and_nothing_else_can(host):
    """What open_sender relies on: vLLM's rank-0 store binds (host, port) with SO_REUSEADDR
    and listens, while the reservation is held; before and after it, a server that is not in
    on it gets EADDRINUSE."""
    from vllm.distributed.utils import StatelessProcessGroup

    with reserved_port() as port:
        assert plain_bind_listen(port) == errno.EADDRINUSE
        group = StatelessProcessGroup.create(host, port, rank=0, world_size=1)
        group.store.set("k", "v")
        assert group.store.get("k") == b"v"
        assert plain_bind_listen(port) == errno.EADDRINUSE
        del group


def test_the_kernel_never_picks_the_reserved_port():
    """bind to port 0 (with and without SO_REUSEADDR) and outgoing connections (the kernel
    picks their local port; to many loopback addresses, so each lands on its own spot of the
    ephemeral range) all skip a port a socket is bound to. A sample, all sockets held open at
    once so each draw is a different port."""
    draws = 1000
    with reserved_port() as port:
        held = []
        try:
            for reuse in (0, 1):
                for _ in range(draws):
                    s = socket.socket()
                    held.append(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
                    s.bind(("", 0))
            bound = [s.getsockname()[1] for s in held]
            assert len(set(bound)) == len(bound)  # every draw a different port
            with socket.socket() as server:
                server.bind(("", 0))
                server.listen(4096)
                target = server.getsockname()[1]
                for i in range(draws):
                    c = socket.socket()
                    held.append(c)
                    c.connect((f"127.{1 + i // 250}.{i % 250}.1", target))
                assert port not in [s.getsockname()[1] for s in held]
        finally:
            for s in held:
                s.close()
