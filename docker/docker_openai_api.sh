#!/usr/bin/env bash
# Serve the OpenAI-compatible API (openai_api.py) from the qwen image, in the background.
# Run `docker_openai_api.sh --help` for the options; docs/docker.md explains the images.
set -euo pipefail

prog=${0##*/}
purpose="Serve the OpenAI-compatible API (openai_api.py) from the qwen image, in the background."
script=openai_api.py
name=qwen-openai-api
port=8000
url_path=/v1

case "${BASH_SOURCE[0]}" in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
# shellcheck source=docker/launcher.sh
. "$here/launcher.sh"
launch "$@"
