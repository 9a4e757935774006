"""TLS on a socket spoon binds itself: the ``ssl:`` endpoint, pre-forked or not.

Twisted's ``ssl:`` endpoint binds its own port in the process that parses it, so a pool
could not share it.  spoon parses ``ssl:`` as a TCP socket plus these settings
(:func:`spoon.net.parse_socket_endpoint`), binds the socket once like ``tcp:``, and every
process serving it wraps its protocol factory in Twisted's TLS layer
(:func:`wrap_factory`).  The settings travel to a pool's supervisor on its command line
(:func:`to_arguments` / :func:`from_arguments`).

The keywords are Twisted's: ``privateKey`` (a PEM file; the certificate too unless
``certKey`` names it), ``certKey``, ``extraCertChain`` (intermediate certificates, PEM),
``dhParameters``; and spoon's ``caCertsDir``: a directory whose ``*.pem`` certificates
sign the client certificates, which are then required (and shown to handlers by
``self.request.getpeercert()``).
"""

import glob
import os

__all__ = ["KEYWORDS", "check_settings", "certificate_options", "wrap_factory", "to_arguments", "from_arguments"]

#: The ssl: endpoint keywords that configure TLS (the others say where to listen).
KEYWORDS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCertsDir")

_BEGIN_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def check_settings(settings, description):
    """``settings`` (keyword -> value, from an ssl: endpoint) as spoon keeps them; raises
    ValueError for what cannot work."""
    unknown = set(settings) - set(KEYWORDS)
    if unknown:
        raise ValueError("endpoint %r: spoon does not support %s on ssl: endpoints" % (
            description, ", ".join(sorted(unknown))))
    if not settings.get("privateKey"):
        raise ValueError("endpoint %r needs privateKey=FILE" % description)
    return {key: value for key, value in settings.items() if value}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _certificates(data):
    """Every PEM certificate in ``data``, as pyOpenSSL X509 objects."""
    from twisted.internet import ssl

    blocks = data.split(_BEGIN_CERTIFICATE)[1:]
    return [ssl.Certificate.loadPEM(_BEGIN_CERTIFICATE + block).original for block in blocks]


def certificate_options(settings):
    """A Twisted ``CertificateOptions`` (the TLS context factory) from the files the
    settings name; raises OSError or an SSL error for a file missing or unreadable."""
    from twisted.internet import ssl
    from twisted.python.filepath import FilePath

    key = settings["privateKey"]
    cert = settings.get("certKey", key)
    pem = _read(key) if cert == key else _read(key) + b"\n" + _read(cert)
    mine = ssl.PrivateCertificate.loadPEM(pem)
    options = {"privateKey": mine.privateKey.original, "certificate": mine.original}
    if settings.get("extraCertChain"):
        options["extraCertChain"] = _certificates(_read(settings["extraCertChain"]))
    if settings.get("dhParameters"):
        options["dhParameters"] = ssl.DiffieHellmanParameters.fromFile(FilePath(settings["dhParameters"]))
    if settings.get("caCertsDir"):
        authorities = []
        for path in sorted(glob.glob(os.path.join(settings["caCertsDir"], "*.pem"))):
            authorities += [ssl.Certificate(x509) for x509 in _certificates(_read(path))]
        if not authorities:
            raise OSError("caCertsDir=%s holds no *.pem certificate" % settings["caCertsDir"])
        options["trustRoot"] = ssl.trustRootFromCertificates(authorities)  # and required
    return ssl.CertificateOptions(**options)


def wrap_factory(factory, settings):
    """``factory`` behind Twisted's TLS layer, server side, with ``settings``' files."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    return TLSMemoryBIOFactory(certificate_options(settings), False, factory)


def to_arguments(settings):
    """The settings as ``--tls KEYWORD=VALUE`` arguments of a supervisor's command line."""
    args = []
    for key in KEYWORDS:
        if key in settings:
            args += ["--tls", "%s=%s" % (key, settings[key])]
    return args


def from_arguments(values):
    """The settings back from the ``--tls`` values :func:`to_arguments` made."""
    settings = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep:
            raise ValueError("--tls %r: KEYWORD=VALUE expected" % value)
        settings[key] = rest
    return check_settings(settings, "--tls")
