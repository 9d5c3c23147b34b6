#!/usr/bin/env python3
"""What the PostgreSQL session reset costs the server, per request.

Sends pipelines over PostgreSQL's wire protocol on one connection and reads that
backend's CPU time from /proc, so the server must run on this machine and let the user
in without a password (trust), as the project's test server does:

    python3 benches/session_reset_cost.py [postgres://user@host:port/db] [rounds] [requests]

The URL defaults to TENANTRY_TEST_POSTGRES_URL, else postgres://postgres@127.0.0.1:5432/postgres.
A scratch database with a unique name is created and dropped. Variants run in
interleaved rounds; each figure is the median over rounds of the backend's CPU per
request, and the ratio is against the point select alone from the same rounds. The last
variants send several requests (each with its own Sync) in one write, as the data plane
does with requests that waited for a connection.
"""

import os
import socket
import statistics
import struct
import sys
import uuid
from urllib.parse import urlparse

RESET = ["RESET ALL", "CLOSE ALL", "UNLISTEN *", "DISCARD TEMP", "DISCARD SEQUENCES"]


def msg(kind, body):
    return kind + struct.pack("!i", len(body) + 4) + body


def cstr(text):
    return text.encode() + b"\0"


def parse(name, sql):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(statement, params=()):
    body = cstr("") + cstr(statement) + struct.pack("!hh", 1, 1) + struct.pack("!h", len(params))
    for param in params:
        body += struct.pack("!i", len(param)) + param
    return msg(b"B", body + struct.pack("!hh", 1, 1))


def execute():
    return msg(b"E", cstr("") + struct.pack("!i", 0))


def sync():
    return msg(b"S", b"")


def query(sql):
    return msg(b"Q", cstr(sql))


class Connection:
    def __init__(self, host, port, user, database):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        body = struct.pack("!i", 196608) + cstr("user") + cstr(user)
        body += cstr("database") + cstr(database) + b"\0"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        for kind, payload in self.read_until_ready():
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                sys.exit(
                    "the server asks for a password; this measurement needs trust "
                    "authentication for a local user (as the project's test server has)"
                )

    def read_until_ready(self, groups=1):
        seen = 0
        messages = []
        while True:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!i", self.buf[1:5])[0]:
                data = self.sock.recv(65536)
                if not data:
                    sys.exit("the server closed the connection")
                self.buf += data
            kind = self.buf[0:1]
            length = struct.unpack("!i", self.buf[1:5])[0]
            payload = self.buf[5 : 1 + length]
            self.buf = self.buf[1 + length :]
            messages.append((kind, payload))
            if kind == b"E":
                sys.exit(f"the server refused a message: {payload!r}")
            if kind == b"Z":
                seen += 1
                if seen == groups:
                    return messages

    def simple(self, sql):
        self.sock.sendall(query(sql))
        return self.read_until_ready()


def backend_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main():
    url = urlparse(
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("TENANTRY_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    )
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    pipelines = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    host, port, user = url.hostname or "127.0.0.1", url.port or 5432, url.username or "postgres"
    admin = Connection(host, port, user, (url.path or "/postgres").lstrip("/") or "postgres")
    scratch = f"tenantry_reset_cost_{uuid.uuid4().hex[:8]}"
    admin.simple(f'CREATE DATABASE "{scratch}"')
    try:
        conn = Connection(host, port, user, scratch)
        conn.simple(
            "CREATE TABLE kv (id int PRIMARY KEY, v text); "
            "INSERT INTO kv SELECT g, 'value ' || g FROM generate_series(1, 1000) g"
        )
        rows = conn.simple("SELECT pg_backend_pid()")
        pid = int([p for k, p in rows if k == b"D"][0][6:])
        setup = parse("sel", "SELECT v FROM kv WHERE id = $1")
        setup += b"".join(parse(f"r{n}", sql) for n, sql in enumerate(RESET)) + sync()
        conn.sock.sendall(setup)
        conn.read_until_ready()
        select = bind("sel", [struct.pack("!i", 7)]) + execute()
        prepared_reset = b"".join(bind(f"r{n}") + execute() for n in range(len(RESET)))
        # name: (messages of one write, ReadyForQuery answers to read, requests in it)
        variants = {
            "point select alone": (select + sync(), 1, 1),
            "reset parsed each time + select": (
                b"".join(parse("", sql) + bind("") + execute() for sql in RESET) + select + sync(),
                1,
                1,
            ),
            "reset prepared once + select (the data plane)": (prepared_reset + select + sync(), 1, 1),
            "reset as one simple query + select": (query("; ".join(RESET)) + select + sync(), 2, 1),
            "BEGIN + reset + select + COMMIT": (
                query("BEGIN; " + "; ".join(RESET)) + select + sync() + query("COMMIT"),
                3,
                1,
            ),
            "reset prepared + select, 4 requests per write (waiting requests sent together)": (
                (prepared_reset + select + sync()) * 4,
                4,
                4,
            ),
            "reset prepared + select, 8 requests per write": (
                (prepared_reset + select + sync()) * 8,
                8,
                8,
            ),
        }
        tick = os.sysconf("SC_CLK_TCK")
        figures = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (messages, groups, requests) in variants.items():
                writes = max(1, pipelines // requests)
                before = backend_cpu_ticks(pid)
                for _ in range(writes):
                    conn.sock.sendall(messages)
                    conn.read_until_ready(groups)
                after = backend_cpu_ticks(pid)
                figures[name].append((after - before) / tick / (writes * requests) * 1e6)
        conn.sock.close()
    finally:
        admin.simple(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    base = statistics.median(figures["point select alone"])
    print(f"backend CPU per request, median of {rounds} rounds of {pipelines} requests\n")
    print("| pipeline | µs per request | ratio to the select alone |")
    print("| --- | --- | --- |")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
