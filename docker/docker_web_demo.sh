#!/usr/bin/env bash
# Serve the browser chat (web_demo.py) from the qwen image, in the background.
# Run `docker_web_demo.sh --help` for the options; docs/docker.md explains the images.
set -euo pipefail

prog=${0##*/}
purpose="Serve the browser chat (web_demo.py) from the qwen image, in the background."
script=web_demo.py
name=qwen-web-demo
port=7860
url_path=/

case "${BASH_SOURCE[0]}" in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
# shellcheck source=docker/launcher.sh
. "$here/launcher.sh"
launch "$@"
