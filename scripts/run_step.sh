# Sourced by the setup scripts: run_logged LABEL LOG_FILE DESCRIPTION COMMAND...
# Runs COMMAND quietly, appending its output to LOG_FILE, and prints one progress line with its duration; on failure
# it shows the log's tail and exits 1.
run_logged() {
    local label="$1" log_file="$2" description="$3"
    shift 3
    local step_start=$SECONDS
    printf '%-10s %-55s ' "$label" "$description"
    echo "### $description: $*" >>"$log_file"
    if "$@" >>"$log_file" 2>&1; then
        printf 'ok (%ds)\n' "$((SECONDS - step_start))"
    else
        printf 'FAILED (%ds)\n' "$((SECONDS - step_start))"
        echo "--- last lines of $log_file ---" >&2
        grep -v "is ignored: it is neither" "$log_file" | tail -n 30 >&2
        exit 1
    fi
}
