"""A real authoritative DNS server on 127.0.0.1 for tests (UDP and TCP, one port).

Tests publish records (by API or as BIND zone text), inject failures per name, and point
the relay at ``server.nameserver`` ("127.0.0.1:PORT"). Records can change at any time;
every query reads the current table.

    with DNSServer() as dns_server:
        dns_server.add("example.org", "MX", "10 mx.example.org.")
        dns_server.add("mx.example.org", "A", "127.0.0.1")
        dns_server.fail("broken.example", "servfail")
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

from .net import LOOPBACK

FailureMode = Literal["servfail", "timeout"]
_MODES: tuple[str, ...] = ("servfail", "timeout")

NameLike = str | dns.name.Name
TypeLike = str | int | dns.rdatatype.RdataType


def _name(name: NameLike) -> dns.name.Name:
    """Absolute, case-insensitive name; the trailing dot is optional."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def _type(rdtype: TypeLike) -> dns.rdatatype.RdataType:
    if isinstance(rdtype, str):
        return dns.rdatatype.from_text(rdtype.upper())
    return dns.rdatatype.RdataType.make(rdtype)


@dataclass(frozen=True)
class Query:
    """One question the server was asked (recorded in ``DNSServer.queries``)."""

    name: str  # absolute, lower case, with trailing dot
    rdtype: str  # "MX", "TXT", ...
    transport: Literal["udp", "tcp"]


class DNSServer:
    """Authoritative DNS server for tests, on 127.0.0.1, UDP and TCP on the same port.

    - unknown name (and no records below it) -> NXDOMAIN
    - known name without records of the asked type -> NOERROR, empty answer
    - a CNAME at the name answers any other type with that CNAME (not chased)
    - AA flag set; UDP answers too big for the client's payload size come back with TC so
      the client retries over TCP.
    """

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self._lock = threading.RLock()
        self._records: dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset]]
        self._records = {}
        self._failures: dict[tuple[dns.name.Name, dns.rdatatype.RdataType | None], FailureMode] = {}
        self.queries: list[Query] = []
        self._port: int | None = None
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("DNSServer is not started")
        return self._port

    @property
    def nameserver(self) -> str:
        """The relay's ``dns.nameservers`` entry: "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._udp is not None

    def start(self) -> DNSServer:
        if self.running:
            return self
        self._stopping.clear()
        udp, tcp = self._bind()
        self._udp, self._tcp = udp, tcp
        self._port = udp.server_address[1]
        for srv, label in ((udp, "udp"), (tcp, "tcp")):
            thread = threading.Thread(
                target=srv.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"test-dns-{label}-{self._port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _bind(self) -> tuple[socketserver.ThreadingUDPServer, socketserver.ThreadingTCPServer]:
        port = self._port or 0  # a restart keeps the port
        last_error: OSError | None = None
        for _ in range(50):
            udp = _UDPServer((self.host, port), _UDPHandler, self)
            try:
                tcp = _TCPServer((self.host, udp.server_address[1]), _TCPHandler, self)
            except OSError as exc:  # the TCP side of that port is taken: try another
                udp.server_close()
                last_error = exc
                if port:
                    break
                continue
            return udp, tcp
        raise RuntimeError(f"could not bind UDP and TCP on one port: {last_error}")

    def stop(self) -> None:
        self._stopping.set()
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ records

    def add(
        self, name: NameLike, rdtype: TypeLike, value: str | dns.rdata.Rdata, ttl: int = 60
    ) -> None:
        """Add one record (an existing identical record is kept once; ttl is updated).

        ``value`` is presentation format, e.g. "10 mx.example.org." for MX or
        '"v=DKIM1; k=rsa; " "p=MIIB..."' for a TXT with several strings. A TXT value that
        does not start with a quote is taken as one string. Names in values without a
        trailing dot are absolute anyway.
        """
        rtype = _type(rdtype)
        rdata = value if isinstance(value, dns.rdata.Rdata) else self._parse(rtype, value)
        with self._lock:
            rdatasets = self._records.setdefault(_name(name), {})
            rdataset = rdatasets.get(rtype)
            if rdataset is None:
                rdataset = dns.rdataset.Rdataset(dns.rdataclass.IN, rtype)
                rdatasets[rtype] = rdataset
            rdataset.add(rdata)
            rdataset.ttl = ttl

    def set(
        self,
        name: NameLike,
        rdtype: TypeLike,
        values: Iterable[str | dns.rdata.Rdata],
        ttl: int = 60,
    ) -> None:
        """Replace every record of this name and type by ``values`` (empty: remove)."""
        with self._lock:
            self.remove(name, rdtype)
            for value in values:
                self.add(name, rdtype, value, ttl)

    def remove(self, name: NameLike, rdtype: TypeLike | None = None) -> None:
        """Remove the records of one type at name, or every record at name."""
        key = _name(name)
        with self._lock:
            if rdtype is None:
                self._records.pop(key, None)
                return
            rdatasets = self._records.get(key)
            if rdatasets is not None:
                rdatasets.pop(_type(rdtype), None)
                if not rdatasets:
                    del self._records[key]

    def clear(self) -> None:
        """Remove every record (failures stay; see clear_failures)."""
        with self._lock:
            self._records.clear()

    def set_zone_text(self, text: str) -> None:
        """Replace all records by the records in BIND zone-file text."""
        zone = self._parse_zone(text)
        with self._lock:
            self._records.clear()
            self._load_zone(zone)

    def add_zone_text(self, text: str) -> None:
        """Add the records in BIND zone-file text (same name and type: replaced).

        Absolute names are taken as they are; relative names are relative to "$ORIGIN" if
        the text sets one, else to the root. Lines without a TTL get 60 unless "$TTL" says.
        """
        zone = self._parse_zone(text)
        with self._lock:
            self._load_zone(zone)

    def records(self, name: NameLike, rdtype: TypeLike) -> list[str]:
        """The current records of name/type in presentation format (for assertions)."""
        with self._lock:
            rdataset = self._records.get(_name(name), {}).get(_type(rdtype))
            return [] if rdataset is None else [rdata.to_text() for rdata in rdataset]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(name.to_text().lower() for name in self._records)

    # ------------------------------------------------------------------ failures

    def fail(self, name: NameLike, mode: FailureMode, rdtype: TypeLike | None = None) -> None:
        """Make queries for name (every type, or only rdtype) fail.

        'servfail': answer SERVFAIL; 'timeout': never answer (UDP dropped; TCP held open
        without an answer).
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
        key = (_name(name), None if rdtype is None else _type(rdtype))
        with self._lock:
            self._failures[key] = mode

    def clear_failures(self, name: NameLike | None = None) -> None:
        with self._lock:
            if name is None:
                self._failures.clear()
                return
            target = _name(name)
            for key in [k for k in self._failures if k[0] == target]:
                del self._failures[key]

    def query_count(self, name: NameLike | None = None, rdtype: TypeLike | None = None) -> int:
        """How many questions matched name (and rdtype) so far."""
        want_name = None if name is None else _name(name).to_text().lower()
        want_type = None if rdtype is None else dns.rdatatype.to_text(_type(rdtype))
        with self._lock:
            return sum(
                1
                for q in self.queries
                if (want_name is None or q.name == want_name)
                and (want_type is None or q.rdtype == want_type)
            )

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _parse(rtype: dns.rdatatype.RdataType, value: str) -> dns.rdata.Rdata:
        text = value.strip()
        if rtype == dns.rdatatype.TXT and not text.startswith('"'):
            text = _quote_txt(text)
        return dns.rdata.from_text(
            dns.rdataclass.IN, rtype, text, origin=dns.name.root, relativize=False
        )

    @staticmethod
    def _parse_zone(text: str) -> dns.zone.Zone:
        if "$TTL" not in text.upper():
            text = "$TTL 60\n" + text
        return dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)

    def _load_zone(self, zone: dns.zone.Zone) -> None:
        for name, node in zone.nodes.items():
            absolute = _name(name)
            rdatasets = self._records.setdefault(absolute, {})
            for rdataset in node.rdatasets:
                copy = dns.rdataset.Rdataset(dns.rdataclass.IN, rdataset.rdtype)
                for rdata in rdataset:
                    copy.add(rdata)
                copy.ttl = rdataset.ttl
                rdatasets[rdataset.rdtype] = copy

    def _failure_for(
        self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> FailureMode | None:
        with self._lock:
            return self._failures.get((qname, qtype)) or self._failures.get((qname, None))

    def _name_exists(self, qname: dns.name.Name) -> bool:
        # A name exists if it has records or something below it does (empty non-terminal).
        return qname in self._records or any(n.is_subdomain(qname) for n in self._records)

    def handle(self, wire: bytes, transport: Literal["udp", "tcp"]) -> bytes | None:
        """Answer one DNS message; None means send nothing (timeout injection, garbage)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        try:
            return self._answer(query, transport)
        except Exception:  # a bug here must show, and must not look like a timeout
            traceback.print_exc()
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

    def _answer(self, query: dns.message.Message, transport: Literal["udp", "tcp"]) -> bytes | None:
        if not query.question:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, dns.rdatatype.RdataType.make(question.rdtype)
        with self._lock:
            self.queries.append(
                Query(qname.to_text().lower(), dns.rdatatype.to_text(qtype), transport)
            )
        failure = self._failure_for(qname, qtype)
        if failure == "timeout":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if failure == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        with self._lock:
            rdatasets = self._records.get(qname)
            if rdatasets is None:
                if not self._name_exists(qname):
                    response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                answers: list[dns.rdataset.Rdataset] = []
                if qtype == dns.rdatatype.ANY:
                    answers = list(rdatasets.values())
                elif qtype in rdatasets:
                    answers = [rdatasets[qtype]]
                elif dns.rdatatype.CNAME in rdatasets:
                    answers = [rdatasets[dns.rdatatype.CNAME]]
                for rdataset in answers:
                    response.answer.append(
                        dns.rrset.from_rdata_list(qname, rdataset.ttl, list(rdataset))
                    )
        if transport == "tcp":
            return response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            truncated.flags &= ~dns.flags.RA
            truncated.set_rcode(response.rcode())
            return truncated.to_wire()


def _quote_txt(text: str) -> str:
    """One unquoted TXT value -> quoted strings of at most 255 bytes each."""
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    parts = []
    for chunk in chunks:
        escaped = chunk.decode().replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'"{escaped}"')
    return " ".join(parts)


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        dns_server: DNSServer,
    ) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        dns_server: DNSServer,
    ) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns_server.handle(data, "udp")
        if reply is not None:
            with contextlib.suppress(OSError):
                sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        dns_server = self.server.dns_server
        conn.settimeout(30)
        try:
            while not dns_server._stopping.is_set():
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                wire = _recv_exact(conn, length)
                if wire is None:
                    return
                reply = dns_server.handle(wire, "tcp")
                if reply is None:
                    # Timeout injection: keep the connection open, say nothing.
                    dns_server._stopping.wait(30)
                    return
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
