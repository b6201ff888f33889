#!/usr/bin/env bash
# Chat with a -Chat checkpoint in this terminal (cli_demo.py), inside the qwen image.
# Run `docker_cli_demo.sh --help` for the options; docs/docker.md explains the images.
set -euo pipefail

prog=${0##*/}
purpose="Chat with a -Chat checkpoint in this terminal (cli_demo.py), inside the qwen image."
script=cli_demo.py
name=qwen-cli-demo
port=
url_path=

case "${BASH_SOURCE[0]}" in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
# shellcheck source=docker/launcher.sh
. "$here/launcher.sh"
launch "$@"
