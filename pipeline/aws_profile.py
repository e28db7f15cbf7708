"""An AWS profile's settings from the AWS CLI's files, for the object stores and Polars, which
read the environment only.

Owns: which profile ($AWS_PROFILE, else 'default'), its static keys from the credentials file,
its region and endpoint from the config file, and the AWS CLI's precedence: keys in the
environment replace the profile's keys as a set (a profile's session token never goes with an
environment key), and a region or endpoint in the environment replaces the profile's.
The files are INI, so configparser reads them. SSO and assume-role profiles are not resolved.
"""

from __future__ import annotations

import configparser
import os

__all__ = ["profile_options"]

_KEYS = {"aws_access_key_id": "aws_access_key_id", "aws_secret_access_key": "aws_secret_access_key",
         "aws_session_token": "aws_session_token"}
_PLACE = {"region": "aws_region", "endpoint_url": "aws_endpoint_url"}


def _section(variable: str, default: str, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.expanduser(os.environ.get(variable, default)))
    return dict(parser[section]) if parser.has_section(section) else {}


def profile_options() -> dict[str, str]:
    """object_store's settings (aws_access_key_id, aws_region, ...) the profile gives and the
    environment does not."""
    name = os.environ.get("AWS_PROFILE", "default")
    config = _section("AWS_CONFIG_FILE", "~/.aws/config", "default" if name == "default" else f"profile {name}")
    found = {_PLACE[k]: v for k, v in config.items() if k in _PLACE and _PLACE[k].upper() not in os.environ}
    if "AWS_ACCESS_KEY_ID" not in os.environ:
        found |= {_KEYS[k]: v for k, v in {**config, **_section("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials",
                                                                   name)}.items() if k in _KEYS}
    return found
