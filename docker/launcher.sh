# shellcheck shell=bash
# What docker_cli_demo.sh, docker_web_demo.sh and docker_openai_api.sh share: their options
# and the `docker run` command they build. Sourced by them, not run on its own.
#
# A launcher sets, before calling `launch "$@"`:
#   prog      its name, for messages
#   purpose   one line for --help
#   script    the repository script the container runs (cli_demo.py, ...)
#   name      the default container name
#   port      the default host port; empty for the interactive terminal demo
#   url_path  what to print after the address once a server starts (/, /v1, ...)
# The container always listens on port 8000 and finds the checkpoint at /checkpoint.

: "${prog:?}" "${purpose:?}" "${script:?}" "${name:?}" "${port?}" "${url_path?}"

readonly container_port=8000
readonly container_checkpoint=/checkpoint

launcher_usage() {
    cat <<EOF
usage: $prog -c DIR [options] [-- SCRIPT_ARGS...]

$purpose

options:
  -c, --checkpoint DIR  checkpoint directory on this machine (required); mounted read-only
                        at $container_checkpoint in the container
  --image IMAGE         image to run (default: \$QWEN_IMAGE, else qwen:cuda, or qwen:cpu
                        with --cpu; build them with docker/Dockerfile and docker/Dockerfile-cpu)
  -n, --name NAME       container name (default: $name)
  --gpus GPUS           all (default), none, or GPU indices such as 0 or 0,2
  --cpu                 no GPUs: the CPU image, and the script runs with --cpu-only
EOF
    if [ -n "$port" ]; then
        cat <<EOF
  -p, --port PORT       port on this machine (default: $port)
  --host ADDRESS        address on this machine to publish the port on (default: 127.0.0.1,
                        this machine only; 0.0.0.0 for every network interface)
  --foreground          stay attached and remove the container on exit, instead of running
                        it in the background
EOF
    fi
    cat <<EOF
  --dry-run             print the docker command instead of running it
  -h, --help            show this help

Arguments after -- go to $script in the container (see its --help).
EOF
}

launcher_die() {
    echo "$prog: error: $*" >&2
    exit 2
}

launch() {
    local checkpoint="" image="${QWEN_IMAGE:-}" gpus=all cpu=0 host=127.0.0.1 foreground=0 dry_run=0
    local -a script_args=()

    while [ $# -gt 0 ]; do
        case "$1" in
            -h | --help)
                launcher_usage
                exit 0
                ;;
            -c | --checkpoint | --image | -n | --name | --gpus | -p | --port | --host)
                [ $# -ge 2 ] || launcher_die "$1 needs a value"
                case "$1" in
                    -c | --checkpoint) checkpoint=$2 ;;
                    --image) image=$2 ;;
                    -n | --name) name=$2 ;;
                    --gpus) gpus=$2 ;;
                    -p | --port | --host)
                        [ -n "$port" ] || launcher_die "$1: $script listens on no port"
                        if [ "$1" = --host ]; then host=$2; else port=$2; fi
                        ;;
                esac
                shift 2
                ;;
            --cpu)
                cpu=1
                shift
                ;;
            --foreground)
                [ -n "$port" ] || launcher_die "--foreground: $script always runs in the foreground"
                foreground=1
                shift
                ;;
            --dry-run)
                dry_run=1
                shift
                ;;
            --)
                shift
                script_args=("$@")
                break
                ;;
            *) launcher_die "unknown argument '$1' (see --help; arguments for $script go after --)" ;;
        esac
    done

    [ -n "$checkpoint" ] || launcher_die "no checkpoint: pass -c DIR, a checkpoint directory on this machine"
    [ -d "$checkpoint" ] || launcher_die "checkpoint directory '$checkpoint' does not exist (or is not a directory)"
    [ -f "$checkpoint/config.json" ] ||
        launcher_die "'$checkpoint' has no config.json: not a checkpoint directory"
    [ -r "$checkpoint/config.json" ] || launcher_die "'$checkpoint/config.json' is not readable"
    checkpoint=$(cd "$checkpoint" && pwd -P) || launcher_die "cannot enter '$checkpoint'"
    case "$checkpoint" in
        *:*) launcher_die "checkpoint path '$checkpoint' contains ':', which docker -v cannot mount; move or link it" ;;
    esac

    [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] ||
        launcher_die "container name '$name': use letters, digits, '_', '.' and '-' (starting with a letter or digit)"

    case "$gpus" in
        none) cpu=1 ;;
        all) ;;
        *) [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || launcher_die "--gpus '$gpus': use all, none, or indices such as 0,2" ;;
    esac
    if [ -z "$image" ]; then
        if [ "$cpu" = 1 ]; then image=qwen:cpu; else image=qwen:cuda; fi
    fi

    if [ -n "$port" ]; then
        [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] ||
            launcher_die "port '$port': use a number from 1 to 65535"
        [[ "$host" =~ ^[0-9A-Za-z.:_-]+$ ]] || launcher_die "--host '$host': use an IP address"
    fi

    local -a run=(run --init --name "$name")
    if [ -z "$port" ] || [ "$foreground" = 1 ]; then
        # Attached: keep stdin open, and a terminal where there is one (never with -d).
        run+=(--rm -i)
        if [ -t 0 ] && [ -t 1 ]; then run+=(-t); fi
    else
        run+=(-d)
    fi
    if [ "$cpu" = 0 ]; then
        if [ "$gpus" = all ]; then
            run+=(--gpus all)
        else
            # The quotes are part of the value: docker reads --gpus as CSV, where 0,2 is two fields.
            run+=(--gpus "\"device=$gpus\"")
        fi
    fi
    run+=(-v "$checkpoint:$container_checkpoint:ro")
    if [ -n "$port" ]; then
        if [[ "$host" == *:* ]]; then
            run+=(-p "[$host]:$port:$container_port")
        else
            run+=(-p "$host:$port:$container_port")
        fi
    fi
    run+=("$image" python "$script" -c "$container_checkpoint")
    if [ -n "$port" ]; then
        run+=(--server-name 0.0.0.0 --server-port "$container_port")
    fi
    if [ "$cpu" = 1 ]; then run+=(--cpu-only); fi
    run+=(${script_args[@]+"${script_args[@]}"})

    if [ "$dry_run" = 1 ]; then
        printf '%q' docker
        printf ' %q' "${run[@]}"
        printf '\n'
        exit 0
    fi

    command -v docker >/dev/null 2>&1 ||
        launcher_die "docker not found: install Docker (and, for GPUs, the NVIDIA Container Toolkit)"
    if docker container inspect "$name" >/dev/null 2>&1; then
        launcher_die "a container named '$name' already exists: remove it (docker rm -f $name) or pass --name"
    fi

    if [ -z "$port" ] || [ "$foreground" = 1 ]; then
        exec docker "${run[@]}"
    fi
    docker "${run[@]}" >/dev/null
    local shown=$host
    case "$host" in
        0.0.0.0 | ::) shown=127.0.0.1 ;;
        *:*) shown="[$host]" ;;
    esac
    echo "started container '$name': http://$shown:$port$url_path"
    echo "  logs: docker logs -f $name"
    echo "  stop: docker rm -f $name"
}
