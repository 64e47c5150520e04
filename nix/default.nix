# The nixery package, and a container image of the server itself.
#
#   nix-build nix -A nixery
#   nix-build nix -A image && docker load < result
#   docker run -p 8080:8080 -e NIXERY_CHANNEL=nixos-unstable nixery
{
  pkgs ? import <nixpkgs> { },
}:

let
  inherit (pkgs) lib;
in
rec {
  nixery = pkgs.callPackage ./package.nix { };

  # Nix runs inside the container as root without a daemon: no build users
  # and no sandbox, which would need privileges a container does not have.
  nixConf = pkgs.writeTextDir "etc/nix/nix.conf" ''
    sandbox = false
    build-users-group =
    experimental-features = nix-command
  '';

  image = pkgs.dockerTools.buildLayeredImage {
    name = "nixery";
    tag = nixery.version;
    contents = [
      nixery
      nixConf
      pkgs.nix
      pkgs.git
      pkgs.openssh # git over ssh for --pkgs-repo
      pkgs.cacert
      pkgs.bashInteractive
      pkgs.coreutils
      pkgs.dockerTools.fakeNss # root in /etc/passwd, which Nix and git look up
    ];
    # Registers the image's store paths in Nix's database, so the Nix in
    # the container knows it already has them.
    includeNixDB = true;
    extraCommands = ''
      mkdir -p -m 1777 tmp
      mkdir -p root var/lib/nixery
    '';
    config = {
      Cmd = [
        (lib.getExe nixery)
        "serve"
      ];
      Env = [
        "STORAGE_PATH=/var/lib/nixery"
        "HOME=/root"
        "USER=root"
        "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
        "NIX_SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
      ];
      ExposedPorts."8080/tcp" = { };
      Volumes."/var/lib/nixery" = { };
    };
    maxLayers = 96;
  };
}
