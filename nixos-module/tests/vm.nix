# NixOS VM test: a server node runs services.nixery, a client node pulls
# an image from it with docker and runs it. Needs nixpkgs and KVM:
#
#   nix-build nixos-module/tests/vm.nix        (or: nix build .#checks.x86_64-linux.vm)
#
# The VMs have no network beyond each other, so the server serves the
# test's own nixpkgs, and the outputs the image needs are put in its store
# beforehand: realising them builds nothing.
{
  pkgs ? import <nixpkgs> { },
}:

pkgs.testers.runNixOSTest {
  name = "nixery";

  nodes.server =
    { pkgs, ... }:
    {
      imports = [ ../default.nix ];
      services.nixery = {
        enable = true;
        openFirewall = true;
        pkgsPath = "${pkgs.path}";
      };
      # Every image holds cacert and iana-etc besides what it asks for.
      virtualisation.additionalPaths = [
        pkgs.hello
        pkgs.cacert
        pkgs.iana-etc
      ];
      # Evaluating nixpkgs takes memory.
      virtualisation.memorySize = 2048;
      environment.systemPackages = [ pkgs.curl ];
    };

  nodes.client = {
    virtualisation.docker.enable = true;
    virtualisation.docker.daemon.settings.insecure-registries = [ "server:8080" ];
  };

  testScript = ''
    start_all()

    # Type=notify: the unit is active only once nixery listens.
    server.wait_for_unit("nixery.service")
    server.succeed("curl -sf http://localhost:8080/v2/")
    server.succeed("systemctl show nixery -p Type | grep -qx Type=notify")
    server.succeed("systemctl show nixery -p DynamicUser | grep -qx DynamicUser=yes")

    client.wait_for_unit("docker.service")
    client.succeed("docker pull server:8080/hello")
    out = client.succeed("docker run --rm server:8080/hello hello")
    assert "Hello, world!" in out, out

    # Unknown packages are a registry error, not a crash.
    client.fail("docker pull server:8080/no-such-package")
    server.succeed("systemctl is-active nixery")

    # SIGTERM: STOPPING=1, then a clean exit.
    server.succeed("systemctl stop nixery")
    server.succeed("systemctl show nixery -p Result | grep -qx Result=success")
  '';
}
