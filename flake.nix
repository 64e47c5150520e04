{
  description = "nixery: a container registry that builds images on demand with Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          built = import ./nix { inherit pkgs; };
        in
        {
          default = built.nixery;
          inherit (built) nixery image;
        }
      );

      # The module builds its default package from this repository with
      # the system's own nixpkgs.
      nixosModules.default = ./nixos-module/default.nix;
      nixosModules.nixery = self.nixosModules.default;

      checks = forAllSystems (
        pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
        in
        {
          package = self.packages.${system}.default;
          vm = import ./nixos-module/tests/vm.nix { inherit pkgs; };
          module-eval =
            assert import ./nixos-module/tests/eval.nix { inherit nixpkgs system; };
            pkgs.runCommand "nixery-module-eval" { } "touch $out";
        }
      );
    };
}
