"""TLS credentials made at test time with GnuTLS's certtool and psktool
(Debian's gnutls-bin): no key is ever committed.

Credentials(dir) makes, in dir:
- ca-cert.pem (and its key, kept apart in ca/), server-cert.pem and
  server-key.pem for CN=localhost, 127.0.0.1: nbdkit's layout, which
  dmremap-server --tls-certificates, nbdkit --tls-certificates and libnbd's
  tls-certificates= read;
- client-cert.pem and client-key.pem, issued by that CA (libnbd's client
  names for --tls-verify-peer);
- rogue/: a client certificate and key issued by another CA, with the good
  CA's certificate beside them, for a client the server must refuse;
- keys.psk: psktool's "username:hexkey" for user "alice"; qemu/psk/keys.psk
  too, where qemu's tls-creds-psk looks;
- qemu/x509/: ca-cert.pem, client-cert.pem, client-key.pem, as qemu's
  tls-creds-x509 (endpoint=client) names them.
"""
import os
import shutil
import subprocess

PSK_USER = "alice"


def _run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _template(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class Credentials:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "tls")
        os.makedirs(self.dir, exist_ok=True)
        d = self.dir
        self.ca_dir = os.path.join(d, "ca")
        os.makedirs(self.ca_dir, exist_ok=True)
        self._ca(self.ca_dir, "dmremap test CA")
        shutil.copy(os.path.join(self.ca_dir, "ca-cert.pem"), os.path.join(d, "ca-cert.pem"))
        self._issue(self.ca_dir, d, "server", "localhost",
                    ["dns_name = localhost", "ip_address = 127.0.0.1", "tls_www_server"])
        self._issue(self.ca_dir, d, "client", "dmremap test client", ["tls_www_client"])
        # A client whose certificate another CA issued.
        self.rogue = os.path.join(d, "rogue")
        rogue_ca = os.path.join(self.rogue, "ca")
        os.makedirs(rogue_ca, exist_ok=True)
        self._ca(rogue_ca, "not the dmremap test CA")
        self._issue(rogue_ca, self.rogue, "client", "rogue client", ["tls_www_client"])
        shutil.copy(os.path.join(d, "ca-cert.pem"), os.path.join(self.rogue, "ca-cert.pem"))
        # Pre-shared keys.
        self.psk_file = os.path.join(d, "keys.psk")
        _run("psktool", "-u", PSK_USER, "-p", self.psk_file)
        self.qemu_psk = os.path.join(d, "qemu", "psk")
        os.makedirs(self.qemu_psk, exist_ok=True)
        shutil.copy(self.psk_file, os.path.join(self.qemu_psk, "keys.psk"))
        self.qemu_x509 = os.path.join(d, "qemu", "x509")
        os.makedirs(self.qemu_x509, exist_ok=True)
        for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
            shutil.copy(os.path.join(d, name), os.path.join(self.qemu_x509, name))

    @staticmethod
    def _ca(where, cn):
        key = os.path.join(where, "ca-key.pem")
        _run("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        info = os.path.join(where, "ca.info")
        _template(info, [f"cn = {cn}", "ca", "cert_signing_key", "expiration_days = 2"])
        _run("certtool", "--generate-self-signed", "--load-privkey", key, "--template", info,
             "--outfile", os.path.join(where, "ca-cert.pem"))

    @staticmethod
    def _issue(ca, where, name, cn, extra):
        key = os.path.join(where, f"{name}-key.pem")
        _run("certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        info = os.path.join(where, f"{name}.info")
        _template(info, [f"cn = {cn}", "organization = dmremap tests", *extra, "signing_key",
                         "encryption_key", "expiration_days = 2"])
        _run("certtool", "--generate-certificate", "--load-ca-certificate",
             os.path.join(ca, "ca-cert.pem"), "--load-ca-privkey", os.path.join(ca, "ca-key.pem"),
             "--load-privkey", key, "--template", info,
             "--outfile", os.path.join(where, f"{name}-cert.pem"))

    def x509_query(self, certificates=None):
        """libnbd URI query parameters for an X.509 client."""
        return f"tls-certificates={certificates or self.dir}"

    def psk_query(self):
        return f"tls-psk-file={self.psk_file}"
