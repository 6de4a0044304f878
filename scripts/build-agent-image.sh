#!/usr/bin/env bash
# The agent's image alone: scripts/build-image.sh agent (see its --help).
exec "$(dirname "$0")/build-image.sh" agent "$@"
