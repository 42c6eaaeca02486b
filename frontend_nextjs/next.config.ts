import type { NextConfig } from "next";

const nextConfig: NextConfig = {
  // A static site in out/, served by the Python server (--client_dir) or any static file server.
  output: "export",
  // A static export has no server to optimize images at request time.
  images: { unoptimized: true },
};

export default nextConfig;
