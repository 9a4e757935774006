"""A TLS peer certificate in the shape ``ssl.SSLSocket.getpeercert()`` gives.

Twisted's TLS transports hand out pyOpenSSL ``X509`` objects; handlers written for the
standard library's ``ssl`` module expect a dict of long attribute names and text dates.
This module does only that conversion, so ``spoon.greenio`` needs no TLS packages unless a
connection really is TLS.
"""

#: OpenSSL's long names for the attributes certificates commonly carry (what ``ssl`` shows).
LONG_NAMES = {
    "CN": "commonName",
    "C": "countryName",
    "L": "localityName",
    "ST": "stateOrProvinceName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "DC": "domainComponent",
    "UID": "userId",
    "STREET": "streetAddress",
    "1.2.840.113549.1.9.1": "emailAddress",
}

#: The date format of ``ssl``'s notBefore / notAfter.
SSL_DATE = "%b %e %H:%M:%S %Y GMT"  # day padded with a space, as ssl prints it


def _name(name):
    return tuple(
        tuple((LONG_NAMES.get(a.rfc4514_attribute_name, a.rfc4514_attribute_name), a.value) for a in rdn)
        for rdn in name.rdns
    )


def peer_certificate(x509, binary_form=False):
    """``x509`` (pyOpenSSL, or None) as ``ssl``'s dict, or its DER bytes with
    ``binary_form``; None stays None."""
    if x509 is None:
        return None
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.to_cryptography()
    if binary_form:
        return cert.public_bytes(Encoding.DER)
    info = {
        "subject": _name(cert.subject),
        "issuer": _name(cert.issuer),
        "version": cert.version.value + 1,
        "serialNumber": _serial_text(cert.serial_number),
        "notBefore": cert.not_valid_before_utc.strftime(SSL_DATE),
        "notAfter": cert.not_valid_after_utc.strftime(SSL_DATE),
    }
    try:
        names = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
    except cx509.ExtensionNotFound:
        return info
    info["subjectAltName"] = tuple(("DNS", dns) for dns in names.get_values_for_type(cx509.DNSName))
    return info


def _serial_text(serial):
    """The serial number as the ssl module writes it: upper-case hex, whole bytes (a
    leading 0 when the hex has an odd number of digits)."""
    text = "%X" % serial
    return "0" + text if len(text) % 2 else text
