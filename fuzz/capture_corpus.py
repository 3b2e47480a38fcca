#!/usr/bin/python3
"""Writes the fuzzers' seed corpora into fuzz/corpus/.

server/: the bytes real clients send to dmremap-server, captured by a
recording proxy between each client and the server: nbdinfo (--size, --can,
--map, --list, a full dump), libnbd sessions that use every command and
structured replies, qemu-io and qemu-img. Each capture is stored twice, with
the fuzzer's first byte selecting the writable (0) or read-only (1) export.

metadata/: patch lists for metadata_fuzzer (see its header): one damaged
byte in each metadata unit, and units copied over their neighbours.

Run with Debian's python3 (python3-libnbd) and a built server:
  fuzz/capture_corpus.py build/release/server/dmremap-server build/release/tools/dmremap
"""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

HERE = os.path.dirname(os.path.abspath(__file__))


def save(kind, body):
    d = os.path.join(HERE, "corpus", kind)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(body).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(body)


class Recorder:
    """A Unix-socket proxy that keeps what each client sent."""

    def __init__(self, listen, target):
        self.target = target
        self.captures = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(listen)
        self.sock.listen(8)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client):
        server = socket.socket(socket.AF_UNIX)
        server.connect(self.target)
        sent = bytearray()
        self.captures.append(sent)

        def up():
            while data := client.recv(65536):
                sent.extend(data)
                server.sendall(data)
            server.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=up, daemon=True)
        t.start()
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except OSError:
            pass  # the client hung up first
        t.join(5)
        client.close()
        server.close()


def libnbd_session(uri):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("x-dmremap:remapped")
    h.connect_uri(uri)
    h.pwrite(b"\x5a" * 8192, 4096, nbd.CMD_FLAG_FUA)
    h.pread(8192, 4096)
    h.pread_structured(4096, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
    h.trim(4096, 65536)
    h.zero(8192, 131072, nbd.CMD_FLAG_FAST_ZERO if h.can_fast_zero() else 0)
    h.cache(4096, 0)
    h.block_status(1 << 20, 0, lambda *a: 0)
    h.block_status(1 << 20, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
    h.flush()
    try:
        h.pread(4096, 1 << 40)  # out of range: EINVAL
    except nbd.Error:
        pass
    h.shutdown()


def capture_server(server_bin, cli_bin):
    with tempfile.TemporaryDirectory() as d:
        main, spare = os.path.join(d, "main.img"), os.path.join(d, "spare.img")
        for path, size in ((main, 4 << 20), (spare, 2 << 20)):
            with open(path, "wb") as f:
                f.truncate(size)
        subprocess.run([cli_bin, "format", "--main", main, "--spare", spare], check=True,
                       capture_output=True)
        real, proxy = os.path.join(d, "real.sock"), os.path.join(d, "proxy.sock")
        srv = subprocess.Popen([server_bin, "--unix", real, "--main", main, "--spare", spare],
                               stderr=subprocess.DEVNULL)
        while not os.path.exists(real):
            time.sleep(0.05)
        rec = Recorder(proxy, real)
        uri = f"nbd+unix:///?socket={proxy}"
        try:
            for args in (["--size"], ["--can", "structured-reply"], ["--map"],
                         ["--map=x-dmremap:remapped"], ["--list"], ["--json"]):
                subprocess.run(["nbdinfo", *args, uri], check=True, capture_output=True)
            libnbd_session(uri)
            subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k",
                            "-c", "read -P 0x33 0 64k", "-c", "discard 64k 64k",
                            "-c", "write -z 128k 64k", f"nbd:unix:{proxy}"],
                           check=True, capture_output=True)
            subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", f"nbd:unix:{proxy}",
                            main], capture_output=True)
            time.sleep(0.5)
        finally:
            srv.terminate()
            srv.wait()
        for sent in rec.captures:
            for mode in (b"\x00", b"\x01"):
                save("server", mode + bytes(sent))
            save_tls_variants(bytes(sent))
        return len(rec.captures)


def save_tls_variants(sent):
    """A capture as a TLS client would send it, in the fuzzers' plaintext view:
    the client's flags, STARTTLS, then the same options and requests (over
    TLS in real life). Mode byte 0x08 serves it with --tls=require, 0x04
    with --tls=on (server_fuzzer: bits 2-7 modulo 3; session_fuzzer: bit 2
    runs a real TLS handshake)."""
    if len(sent) < 4:
        return
    starttls = (0x49484156454F5054).to_bytes(8, "big") + (5).to_bytes(4, "big") + bytes(4)
    for mode in (b"\x08", b"\x04"):
        save("server", mode + sent[:4] + starttls + sent[4:])


def metadata_seeds():
    save("metadata", b"")
    for unit in range(0, 40):
        offset = unit * 4096 + 100
        save("metadata", bytes([0]) + offset.to_bytes(3, "big") + b"\x01\xff")
        save("metadata", bytes([1]) + (unit * 4096).to_bytes(3, "big") + b"\x00" +
             (unit + 1).to_bytes(3, "big"))


if __name__ == "__main__":
    n = capture_server(sys.argv[1], sys.argv[2])
    metadata_seeds()
    print(f"captured {n} client sessions; metadata seeds written")
