//! How a client machine comes to trust a private CA: printed by
//! `nixery tls init` and shown on the admin page, so both say the same.

/// Shell steps that install `ca_file` (a path on the client) as the CA of
/// the registry at `host_port` for docker, podman/skopeo/CRI-O,
/// containerd and the system store (curl, browsers).
pub fn client_steps(host_port: &str, ca_file: &str) -> String {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']');
    format!(
        "# docker (read at each pull, no restart needed)
sudo mkdir -p /etc/docker/certs.d/{host_port}
sudo cp {ca_file} /etc/docker/certs.d/{host_port}/ca.crt
# podman, skopeo, buildah, CRI-O
sudo mkdir -p /etc/containers/certs.d/{host_port}
sudo cp {ca_file} /etc/containers/certs.d/{host_port}/ca.crt
# containerd (ctr --hosts-dir /etc/containerd/certs.d, or config_path in the CRI config)
sudo mkdir -p /etc/containerd/certs.d/{host_port}
sudo cp {ca_file} /etc/containerd/certs.d/{host_port}/ca.crt
printf 'server = \"https://{host_port}\"\\n\\n[host.\"https://{host_port}\"]\\n  ca = \"/etc/containerd/certs.d/{host_port}/ca.crt\"\\n' | sudo tee /etc/containerd/certs.d/{host_port}/hosts.toml
# the system store (curl, browsers, Go programs); Debian/Ubuntu:
sudo cp {ca_file} /usr/local/share/ca-certificates/nixery-{host}.crt && sudo update-ca-certificates
# Fedora/RHEL: sudo cp {ca_file} /etc/pki/ca-trust/source/anchors/nixery-{host}.crt && sudo update-ca-trust
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_client_directory() {
        let steps = client_steps("registry.lan:8443", "ca.crt");
        for path in [
            "/etc/docker/certs.d/registry.lan:8443/ca.crt",
            "/etc/containers/certs.d/registry.lan:8443/ca.crt",
            "/etc/containerd/certs.d/registry.lan:8443/hosts.toml",
            "/usr/local/share/ca-certificates/nixery-registry.lan.crt",
        ] {
            assert!(steps.contains(path), "{path} in {steps}");
        }
    }
}
